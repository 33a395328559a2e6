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
