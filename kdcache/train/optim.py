"""train-student's optimiser recipe, as functions any loop (or transformers' Trainer) can call,
so that the same settings give the same steps everywhere."""
from __future__ import annotations

import torch

WARMUP_FRACTION = 0.06  # of the steps, when no warm-up is given
BETAS = (0.9, 0.98)
EPS = 1e-6


def default_warmup(total_steps: int) -> int:
    """Warm-up steps train-student uses when --warmup-steps is not given: 6 % of the steps."""
    return round(WARMUP_FRACTION * total_steps)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, *, betas=BETAS, eps: float = EPS,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norms).
    fused: the fused CUDA kernel (default: when the parameters are on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]      # matrices and embeddings
    no_decay = [p for p in params if p.dim() < 2]    # biases and norms
    if fused is None:
        fused = bool(params) and params[0].device.type == "cuda"
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                name: str = "linear"):
    """Linear warm-up, then `name` decay (linear, cosine, constant_with_warmup) to step `total_steps`."""
    from transformers import get_scheduler

    warmup = default_warmup(total_steps) if warmup_steps is None else warmup_steps
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
