"""train-student's loss watch: warns once when the logged loss goes non-finite, jumps or stalls."""
from __future__ import annotations

import json
import math

from kdcache.train.watch import LossWatch


def feed(watch: LossWatch, losses, every: int = 10) -> list[tuple[int, str]]:
    out = []
    for i, loss in enumerate(losses, 1):
        out += [(i * every, w) for w in watch.update(i * every, loss)]
    return out


def test_a_healthy_noisy_run_gives_no_warning():
    # Falls, then a noisy plateau far below the start (a converged run is not a stall).
    losses = [0.7, 0.4, 0.2, 0.1] + [0.05, 0.08, 0.06, 0.09, 0.07] * 6
    assert feed(LossWatch(total_steps=340, lr=1e-3), losses) == []


def test_non_finite_loss_warns_once_with_a_lower_rate():
    warned = feed(LossWatch(total_steps=100, lr=0.5), [2.0, 1.5, math.nan, math.inf, math.nan])
    assert len(warned) == 1 and warned[0][0] == 30
    assert "training loss is nan at step 30" in warned[0][1] and "--lr 0.05" in warned[0][1]


def test_a_jump_warns_once():
    watch = LossWatch(total_steps=200, lr=3e-3)
    warned = feed(watch, [4.0, 2.0, 1.0, 0.9, 3.5, 4.0, 0.8])
    assert [step for step, _ in warned] == [50]
    assert "jumped to 3.5 at step 50, 3.9x its best (0.9 at step 40)" in warned[0][1] and "--lr 0.001" in warned[0][1]
    assert watch.warnings == [warned[0][1]]
    # Three times a tiny best, but nowhere near the starting loss: noise at convergence, not a jump.
    assert feed(LossWatch(total_steps=200, lr=3e-3), [4.0, 0.02, 0.07]) == []


def test_a_stall_near_the_start_warns_after_a_quarter_of_the_run():
    # Collapsed: the loss drops to the majority-class level early and stays there.
    losses = [0.69, 0.45, 0.40] + [0.41, 0.40, 0.42] * 5
    warned = feed(LossWatch(total_steps=300, lr=1e-3), losses)
    assert len(warned) == 1 and "has not improved for 80 steps (best 0.4 at step 30)" in warned[0][1]
    assert warned[0][0] == 110  # patience max(50, 300 // 4) = 75 steps


def test_a_resumed_run_replays_its_logged_losses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in ((10, 4.0), (20, 1.0), (30, 3.9))))
    watch = LossWatch.from_metrics(path, total_steps=100, lr=1e-3)
    assert len(watch.warnings) == 1 and "jumped" in watch.warnings[0]   # kept for the summary ...
    assert watch.update(40, 4.0) == []                                  # ... and not repeated
    assert LossWatch.from_metrics(tmp_path / "none.jsonl", 100, 1e-3).warnings == []
