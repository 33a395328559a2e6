"""Length-sorted batches within one shard, capped by rows and/or by padded tokens.

Sorting by length keeps padding small; doing it within a shard (deterministically, ties broken
by row order) makes every forward pass reproducible, so a resumed or multi-rank dump computes
exactly what an uninterrupted one does.
"""
from __future__ import annotations


def make_batches(lengths: list[int], *, batch_size: int | None = None,
                 max_tokens: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches, longest rows first.

    A batch holds at most batch_size rows and at most max_tokens padded tokens
    (rows x longest row); a single row longer than max_tokens still gets its own batch.
    """
    if not batch_size and not max_tokens:
        raise ValueError("need batch_size or max_tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        fits = (not batch_size or len(current) < batch_size) and (not max_tokens or (len(current) + 1) * width <= max_tokens)
        if current and not fits:
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens the teacher processes, padding included (for the padding-waste figure)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)
