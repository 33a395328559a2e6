"""Length-sorted batches within one shard, capped by rows and/or by padded tokens.

Sorting by length keeps padding small; doing it within a shard (deterministically, ties broken
by row order) makes every forward pass reproducible, so a resumed or multi-rank dump computes
exactly what an uninterrupted one does.
"""
from __future__ import annotations


# A batch closes when the next (shorter) row would push its padded ÷ real tokens above this.
# Rows are sorted, so batches are near-homogeneous anyway; the cap matters for short, varied rows
# (one line per example) where a token budget alone would group lengths 40..10 together.
MAX_PADDING_RATIO = 1.05


def make_batches(lengths: list[int], *, batch_size: int | None = None, max_tokens: int | None = None,
                 max_padding: float | None = MAX_PADDING_RATIO) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches, longest rows first.

    A batch holds at most batch_size rows, at most max_tokens padded tokens (rows x longest row)
    and at most max_padding x its real tokens in padded tokens; a single row always forms a batch.
    """
    if not batch_size and not max_tokens:
        raise ValueError("need batch_size or max_tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, width, real = [], [], 0, 0
    for i in order:
        n = len(current) + 1
        fits = ((not batch_size or n <= batch_size) and (not max_tokens or n * width <= max_tokens)
                and (not max_padding or n * width <= max_padding * (real + lengths[i])))
        if current and not fits:
            batches.append(current)
            current, real = [], 0
        if not current:
            width = lengths[i]  # longest row of the batch (sorted descending)
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens the teacher processes, padding included (for the padding-waste figure)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)
