"""Each student's learning rate in a sweep: one rate for every size is fair to none of them.

Adam's update size does not shrink with width, so a rate that suits a narrow student makes a wide
one's hidden activations move too far per step (the width-transfer rules for Adam, e.g. muP, scale
the hidden layers' rate as 1/width). The `width` rule gives each student
    lr = base_lr x BASE_WIDTH / hidden_size
so L*-H128 trains at base_lr, L*-H256 at half of it, L*-H768 at a sixth. Measured on the three
pipelines in benchmarks/sweep.md. `none` passes one rate (--lr, or train-student's default) to all.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .runs import option_value

RULES = ("width", "none")
BASE_WIDTH = 128     # the narrowest preset: it trains at the base rate
BASE_LR = 1e-3       # the width rule's base rate when --lr is not given (benchmarks/sweep.md)
_PRESET_WIDTH = re.compile(r"^L\d+-H(\d+)$", re.IGNORECASE)
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


@dataclass(frozen=True)
class LearningRate:
    value: float | None  # None: train-student's own default (rule none, no --lr)
    source: str          # how it was chosen, for the log and the run's record
    by_rule: bool = False  # the sweep computed it (else the student's options already say it)

    def args(self) -> list[str]:
        return [] if self.value is None else ["--lr", f"{self.value:.3g}"]


def student_width(spec: str, args: list[str]) -> int | None:
    """Hidden size of a student spec (a --hidden option wins); None when it cannot be told."""
    hidden = option_value(args, "--hidden")
    if hidden is not None:
        return int(hidden)
    match = _PRESET_WIDTH.match(spec)
    if match:
        return int(match.group(1))
    path = Path(spec)
    config = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return next((int(values[k]) for k in _WIDTH_KEYS if isinstance(values, dict) and values.get(k)), None)


def default_rule(train_args: list[str]) -> str:
    """An explicit --lr means what it says (one rate for all); without it, the width rule."""
    return "none" if option_value(train_args, "--lr") is not None else "width"


def student_lr(rule: str, spec: str, train_args: list[str], override: str | None) -> LearningRate:
    """The rate one student trains at. `train_args`: the sweep's and this student's options."""
    if override is not None:
        return LearningRate(float(override), "per-student :lr")
    given = option_value(train_args, "--lr")
    if rule == "none":
        return LearningRate(float(given) if given is not None else None,
                            "--lr for every student" if given is not None else "train-student default")
    base = float(given) if given is not None else BASE_LR
    width = student_width(spec, train_args)
    if width is None:
        return LearningRate(base, f"width rule: base {base:.3g} (width unknown, not scaled)", True)
    return LearningRate(base * BASE_WIDTH / width, f"width rule: {base:.3g} x {BASE_WIDTH}/{width}", True)
