"""Training checkpoints: one directory OUT/checkpoint, replaced atomically.

Contents (nothing is pickled code: the model is safetensors, the rest loads with
torch.load(weights_only=True)):
  model.safetensors   the student's weights
  trainer.pt          optimizer, scheduler, grad-scaler state, step, tokens, seconds
  rank{r}.pt          per-rank RNG states and stream position
  meta.json           step and the run settings that must match on --resume
A new checkpoint is assembled in OUT/.checkpoint.tmp and renamed into place; a crash between
the two renames leaves OUT/.checkpoint.old, which loading falls back to.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

from ..cache.files import fsync_file

CHECKPOINT = "checkpoint"
_TMP, _OLD = ".checkpoint.tmp", ".checkpoint.old"
# Called (main rank) with a new checkpoint's folder once it is in place, by --out folder:
# `train-student --out s3://...` uploads it from its staging folder (kdcache.train.bucket_out).
ON_SAVED: dict[str, Callable[[Path], None]] = {}


def find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT, _OLD):
        path = Path(out) / name
        if (path / "meta.json").is_file():
            return path
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def save(out: Path, dist, *, model, trainer_state: dict, rank_state: dict, meta: dict) -> None:
    """Collective: every rank calls it (each writes its own rank file)."""
    out = Path(out)
    tmp = out / _TMP
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rank_file = tmp / f"rank{dist.rank}.pt"
    torch.save(rank_state, rank_file)
    fsync_file(rank_file)
    if dist.is_main:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in ("model.safetensors", "trainer.pt", "meta.json"):
            fsync_file(tmp / name)
    dist.barrier()
    if dist.is_main:
        final, old = out / CHECKPOINT, out / _OLD
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if str(out) in ON_SAVED:
            ON_SAVED[str(out)](final)
    dist.barrier()


def load(path: Path, rank: int, *, model) -> tuple[dict, dict]:
    """Load weights into `model`; return (trainer state, this rank's state)."""
    load_model(model, str(path / "model.safetensors"))
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    rank_state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    return trainer_state, rank_state


def remove(out: Path) -> None:
    for name in (CHECKPOINT, _OLD, _TMP):
        shutil.rmtree(Path(out) / name, ignore_errors=True)
