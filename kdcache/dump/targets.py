"""Soft targets on the teacher's device: log-softmax in fp32, then top-k.

Only the selected target positions are normalised, and only (ids, log-probs) of the top k leave
the device: full-vocabulary logits are never copied to the host.
"""
from __future__ import annotations

import torch

# float16 cannot hold log-probs below this; such tokens have probability ~0 anyway.
FP16_MIN = -65504.0


def topk_targets(logits: torch.Tensor, batch_index: torch.Tensor | None, position_index: torch.Tensor | None,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (int32) and log-probs (float16) at the given positions, plus a per-target finite flag.

    logits: (B, T, V) for LMs with batch_index/position_index selecting targets, or (B, C) for
    sequence classification (indices None: one target per row).
    """
    selected = logits if batch_index is None else logits[batch_index, position_index]
    # fp32 math without materialising an fp32 copy of the selected logits first (one pass fewer).
    logprobs = torch.log_softmax(selected, dim=-1, dtype=torch.float32)
    values, ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    # A NaN logit makes the whole row NaN, a +inf logit makes the top value inf - inf = NaN, so the top
    # value alone tells; -inf logits (vocabulary masking some models do) are legitimate and pass.
    finite = torch.isfinite(values[:, 0])
    return ids.to(torch.int32), values.clamp(min=FP16_MIN).to(torch.float16), finite


# ---------------------------------------------------------------- sampled targets (format v2)
#
# Draws are a pure function of (seed, example id, position, draw index) and the teacher's
# probabilities: counter-based uniforms (an integer hash, computed elementwise on the device), then
# inverse-CDF sampling. Nothing depends on which batch, shard, rank or session a position is in.

_MASK32 = 0xFFFFFFFF
# Elements (targets x vocab) of the float64 cumulative sums per chunk: 2^24 x 8 B = 128 MiB.
SAMPLE_CHUNK_ELEMENTS = 1 << 24


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, without int64 overflow: c is split into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash ("lowbias32", C. Wellons): every input bit flips ~half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fold a 64-bit integer key into the 32-bit state h, low half then high half."""
    h = _mix32(h ^ (value & _MASK32))
    return _mix32(h ^ ((value >> 32) & _MASK32) ^ 0x9E3779B9)


def draw_uniforms(seed: int, example_ids: torch.Tensor, positions: torch.Tensor, draws: int) -> torch.Tensor:
    """(M, draws) float64 uniforms in [0, 1), one row per target, a pure function of
    (seed, example id, position, draw index) with 53 random bits each."""
    device = example_ids.device
    h = _absorb(torch.full_like(example_ids, 0x243F6A88), torch.full_like(example_ids, int(seed)))
    h = _absorb(h, example_ids.long())
    h = _absorb(h, positions.long())[:, None]
    j = torch.arange(draws, device=device, dtype=torch.long)[None, :]
    hi = _mix32(h ^ _mix32(2 * j + 1))          # two independent 32-bit words per draw
    lo = _mix32(hi ^ _mix32(2 * j + 2) ^ 0x85EBCA6B)
    bits = ((hi >> 5) << 26) | (lo >> 6)        # 27 + 26 = 53 bits
    return bits.double() * (1.0 / (1 << 53))


def _unique_counts(ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: distinct ids (ascending, packed to the left) and how often each occurs; empty slots
    get count 0. ids: (M, S) int64 draws."""
    big = torch.iinfo(torch.long).max
    ids = torch.where(valid, ids, big)
    sorted_ids, _ = ids.sort(dim=1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = new.long().cumsum(1) - 1
    unique = torch.full_like(sorted_ids, big).scatter_(1, slot, sorted_ids)  # duplicates write equal values
    counts = torch.zeros_like(sorted_ids).scatter_add_(1, slot, (sorted_ids != big).long())
    return unique, counts


def sampled_targets(logits: torch.Tensor, batch_index: torch.Tensor, position_index: torch.Tensor,
                    example_ids: torch.Tensor, *, seed: int, samples: int, head: int = 0,
                    chunk_elements: int = SAMPLE_CHUNK_ELEMENTS) -> dict:
    """Sampled soft targets at the given positions (one row per target), on the logits' device.

    Returns padded tensors (the host drops the empty slots):
      head_ids (M, head) int32, head_logprobs (M, head) float16 — the exact top `head` (if head > 0)
      ids (M, samples) int32, logprobs (M, samples) float16, counts (M, samples) int32 — the distinct ids
          drawn, most probable first (ties: smaller id first), count 0 marks an empty slot
      finite (M,) bool — the teacher's log-probs were finite at this target
    `samples` draws with replacement from the teacher's softmax (T = 1), or, with head > 0, from its
    renormalised tail outside the top `head`. example_ids: (M,) the row's example id per target.
    """
    selected = logits[batch_index, position_index]
    m, vocab = selected.shape
    out = {key: [] for key in ("head_ids", "head_logprobs", "ids", "logprobs", "counts", "finite")}
    chunk = max(1, chunk_elements // max(vocab, 1))
    for start in range(0, m, chunk):
        part = slice(start, start + chunk)
        logprobs = torch.log_softmax(selected[part], dim=-1, dtype=torch.float32)
        finite = torch.isfinite(logprobs.max(-1).values)
        # exp in float32 (relative error ~1e-7 per id: no bias worth the name), sums in float64, where
        # float32 would accumulate error over the vocabulary and shift the interval of every later id.
        probs = torch.exp(logprobs).double()
        if head > 0:
            head_values, head_ids = torch.topk(logprobs, head, dim=-1, largest=True, sorted=True)
            probs.scatter_(1, head_ids, 0.0)  # draw from the tail only
            out["head_ids"].append(head_ids.to(torch.int32))
            out["head_logprobs"].append(head_values.clamp(min=FP16_MIN).to(torch.float16))
        cdf = probs.cumsum_(-1)
        total = cdf[:, -1:]
        u = draw_uniforms(seed, example_ids[part], position_index[part], samples)
        # Strictly below the total, so searchsorted lands on an id with positive probability.
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        drawn = torch.searchsorted(cdf, x, right=True).clamp_(max=vocab - 1)
        # A tail with no mass at all (head = vocab, or fp underflow) has nothing to draw.
        valid = (total > 0).expand_as(drawn)
        unique, counts = _unique_counts(drawn, valid)
        present = counts > 0
        at = torch.where(present, unique, 0)
        lp = torch.where(present, logprobs.gather(1, at), float("-inf"))
        # Most probable first (a stable sort keeps ascending ids among ties): entry 0 is the best drawn id.
        order = torch.sort(lp, dim=1, descending=True, stable=True).indices
        out["ids"].append(at.gather(1, order).to(torch.int32))
        out["logprobs"].append(lp.gather(1, order).clamp(min=FP16_MIN).to(torch.float16))
        out["counts"].append(counts.gather(1, order).to(torch.int32))
        out["finite"].append(finite)
    if m == 0:  # no targets: empty results of the right shapes and dtypes
        empty = lambda width, dtype: [torch.zeros((0, width), dtype=dtype, device=logits.device)]  # noqa: E731
        out = {"head_ids": empty(head, torch.int32) if head else [], "head_logprobs": empty(head, torch.float16) if head else [],
               "ids": empty(samples, torch.int32), "logprobs": empty(samples, torch.float16),
               "counts": empty(samples, torch.int32), "finite": [torch.zeros(0, dtype=torch.bool, device=logits.device)]}
    return {key: torch.cat(parts) if parts else None for key, parts in out.items()}


# ---------------------------------------------------------------- token selection (format v3)

def target_entropies(logits: torch.Tensor, batch_index: torch.Tensor, position_index: torch.Tensor,
                     chunk_elements: int = SAMPLE_CHUNK_ELEMENTS) -> torch.Tensor:
    """(M,) float32: the teacher's full-softmax entropy at T = 1, -Σ p log p, at each target, on the
    logits' device (in chunks of targets, so no (M, V) fp32 copy of all of them exists at once).
    NaN where the logits are not finite (the caller's finite check); -inf logits (p = 0) add 0."""
    m, vocab = batch_index.shape[0], logits.shape[-1]
    chunk = max(1, chunk_elements // max(vocab, 1))
    out = []
    for start in range(0, m, chunk):
        part = slice(start, start + chunk)
        logprobs = torch.log_softmax(logits[batch_index[part], position_index[part]], dim=-1, dtype=torch.float32)
        # 0 · log 0 = 0: clamping -inf to the lowest float keeps p · log p = -0 there instead of NaN.
        out.append(-(logprobs.exp() * logprobs.clamp(min=torch.finfo(torch.float32).min)).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def select_targets(entropy: torch.Tensor, batch_index: torch.Tensor, keep_at: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the selected targets: per row the highest-entropy ones, ties broken by
    the lower position (targets come in position order within a row). On the device, with no host sync.

    batch_index (M,): each target's row, non-decreasing. keep_at (K,): computed on the host from the
    rows' target counts: where in the row-grouped, entropy-sorted order the kept targets sit
    (each row's first `keep` slots)."""
    # Highest entropy first; the stable sort keeps the lower position first among equal entropies.
    order = torch.sort(entropy, descending=True, stable=True).indices
    # Regroup by row, keeping that order within each row (batch_index is sorted, so groups stay in row order).
    order = order[torch.sort(batch_index[order], stable=True).indices]
    return torch.sort(order[keep_at]).values
