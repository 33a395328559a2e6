"""Early warnings from the training loss: a run that diverges or stalls should say so while it
trains, not only when its report looks wrong. Warnings only: the run itself is never changed."""
from __future__ import annotations

import json
import math
from pathlib import Path

JUMP_FACTOR = 3.0        # a logged loss this many times the best so far ...
JUMP_SHARE = 0.5         # ... that also gave back half the progress since the first log line
MIN_PATIENCE_STEPS = 50  # a stall is at least this long, and at least a quarter of the run,
STUCK_SHARE = 0.5        # in a run whose best loss is still above half its first (a converged
                         # run's noisy plateau is not a stall)


class LossWatch:
    """Fed every logged (window-averaged) training loss; each kind of warning is given once."""

    def __init__(self, total_steps: int, lr: float):
        self.lr = lr
        self.patience = max(MIN_PATIENCE_STEPS, total_steps // 4)
        self.first = self.best = None
        self.best_step = 0
        self.warnings: list[str] = []
        self._given: set[str] = set()

    @classmethod
    def from_metrics(cls, path: Path, total_steps: int, lr: float) -> "LossWatch":
        """A watch that has already seen a resumed run's logged losses (its old warnings kept, not repeated)."""
        watch = cls(total_steps, lr)
        if Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    watch.update(int(record["step"]), float(record["loss"]))
        return watch

    def _warn(self, kind: str, text: str) -> list[str]:
        if kind in self._given:
            return []
        self._given.add(kind)
        self.warnings.append(text)
        return [text]

    def update(self, step: int, loss: float) -> list[str]:
        """The new warnings for this logged loss (usually none)."""
        if not math.isfinite(loss):
            return self._warn("non-finite", (
                f"training loss is {loss} at step {step}: the run diverged; the learning rate ({self.lr:g}) is likely "
                f"too high for this student: retry with --lr {self.lr / 10:.3g}"))
        out = []
        if self.first is None:
            self.first = loss
        if self.best is not None and loss > JUMP_FACTOR * self.best and loss > self.best + JUMP_SHARE * (self.first - self.best):
            out += self._warn("jump", (
                f"training loss jumped to {loss:.4g} at step {step}, {loss / self.best:.1f}x its best ({self.best:.4g} at "
                f"step {self.best_step}): the learning rate ({self.lr:g}) is likely too high: retry with --lr {self.lr / 3:.3g}"))
        if self.best is None or loss < self.best:
            self.best, self.best_step = loss, step
        elif step - self.best_step >= self.patience and self.best > STUCK_SHARE * self.first:
            out += self._warn("stall", (
                f"training loss has not improved for {step - self.best_step} steps (best {self.best:.4g} at step "
                f"{self.best_step}): the student may have collapsed to one prediction, which a too-high learning rate "
                f"({self.lr:g}) often causes: retry with --lr {self.lr / 3:.3g}"))
        return out
