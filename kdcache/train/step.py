"""The student's loss on a batch: the body over the batch, the output layer only at the target
positions (chunked), the distillation loss. One module, so DDP's forward sees all of it."""
from __future__ import annotations

import torch

from .forward import target_hidden
from .losses import DistillLoss, LossOutput


def student_loss(model, task: str, batch: dict, loss_fn: DistillLoss,
                 teacher_logits: torch.Tensor | None = None) -> LossOutput:
    """loss_fn on `model`'s features at the batch's targets (any HF model of the task)."""
    hidden, head = target_hidden(model, task, batch)
    return loss_fn(hidden, head, batch, teacher_logits=teacher_logits)


class StudentLoss(torch.nn.Module):
    """Student + loss in one module, so DDP's forward sees the whole computation."""

    def __init__(self, model, task: str, loss_fn: DistillLoss):
        super().__init__()
        self.model, self.task, self.loss_fn = model, task, loss_fn

    def forward(self, batch: dict, teacher_logits=None):
        out = student_loss(self.model, self.task, batch, self.loss_fn, teacher_logits)
        return out.loss, out.kd, out.hard
