"""kdcache: pay the teacher once, distil many students from cached top-k soft targets.

The public Python API (README, "Use it from your own trainer"); each name is imported on first
use, so `import kdcache` stays cheap for the CLI:

  open_cache(path_or_uri) -> OpenCache      a checked cache: .task .target_kind .num_rows .num_positions
                                            .manifest .tokenizer_dir .load_tokenizer()
  TrainStream(cache, batch_size=..., seed=...) endless micro-batches for this rank, state_dict()/load_state_dict()
  CacheStream                               the torch IterableDataset under it (one epoch, batches collated)
  move_batch(batch, device)                 a batch's tensors to a device
  target_hidden(model, task, batch)         (features at the targets, output layer): any HF model of the task
  DistillLoss(temperature, alpha, tail)     the composed loss train-student uses; LossOutput
  sparse_kd_and_ce, hard_ce, online_kd, bucket_kd, mix, chunked, sparse_target_weights   its pieces
  student_loss(model, task, batch, loss_fn) target_hidden + loss_fn; StudentLoss: the same as a module (DDP)
  adamw, lr_schedule, default_warmup        train-student's optimiser and schedule
  KdcacheError                              every user-facing error (one line)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_EXPORTS = {
    "open_cache": "kdcache.cache.stream", "OpenCache": "kdcache.cache.stream", "CacheStream": "kdcache.cache.stream",
    "move_batch": "kdcache.cache.collate",
    "TrainStream": "kdcache.train.batches",
    "target_hidden": "kdcache.train.forward", "target_logits": "kdcache.train.forward",
    "DistillLoss": "kdcache.train.losses", "LossOutput": "kdcache.train.losses",
    "sparse_kd_and_ce": "kdcache.train.losses", "hard_ce": "kdcache.train.losses", "online_kd": "kdcache.train.losses",
    "bucket_kd": "kdcache.train.losses", "mix": "kdcache.train.losses", "chunked": "kdcache.train.losses",
    "sparse_target_weights": "kdcache.train.losses",
    "student_loss": "kdcache.train.step", "StudentLoss": "kdcache.train.step",
    "adamw": "kdcache.train.optim", "lr_schedule": "kdcache.train.optim", "default_warmup": "kdcache.train.optim",
    "KdcacheError": "kdcache.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static type checkers see the real names
    from .cache.collate import move_batch
    from .cache.stream import CacheStream, OpenCache, open_cache
    from .errors import KdcacheError
    from .train.batches import TrainStream
    from .train.forward import target_hidden, target_logits
    from .train.losses import (DistillLoss, LossOutput, bucket_kd, chunked, hard_ce, mix, online_kd,
                               sparse_kd_and_ce, sparse_target_weights)
    from .train.optim import adamw, default_warmup, lr_schedule
    from .train.step import StudentLoss, student_loss


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
