"""Expected calibration error: the accumulator against a direct per-position computation, and
`evaluate`'s student and teacher ECE against each other (the teacher evaluated on its own cache)."""
from __future__ import annotations

import numpy as np
import torch

from conftest import shakespeare_lines
from kdcache.train.calibration import CalibrationBins
from kdcache.train.evaluate import evaluate
from stage2_helpers import CLM, teacher_cache


def direct_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """Guo et al.'s definition, written out: bins (b/B, (b+1)/B], weighted |accuracy - confidence|."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        member = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if member.any():
            total += member.sum() / len(confidence) * abs(correct[member].mean() - confidence[member].mean())
    return total


def test_ece_matches_the_definition_in_any_batching():
    rng = np.random.default_rng(0)
    confidence = rng.random(5000) ** 0.5
    correct = rng.random(5000) < confidence ** 2  # overconfident on purpose
    bins = CalibrationBins(10)
    for part in np.array_split(np.arange(5000), 7):  # accumulation must not depend on the batching
        bins.add(torch.from_numpy(confidence[part]), torch.from_numpy(correct[part]))
    expected = direct_ece(confidence, correct, 10)
    assert abs(bins.ece() - expected) < 1e-12
    assert expected > 0.05  # the miscalibration is visible


def test_calibrated_predictions_have_small_ece_and_flipped_ones_large():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.05, 1.0, 200_000)
    calibrated, wrong = CalibrationBins(), CalibrationBins()
    calibrated.add(torch.from_numpy(confidence), torch.from_numpy(rng.random(200_000) < confidence))
    wrong.add(torch.from_numpy(confidence), torch.from_numpy(np.zeros(200_000, dtype=bool)))
    assert calibrated.ece() < 0.01
    assert abs(wrong.ece() - confidence.mean()) < 1e-9  # never right: ECE = mean confidence
    assert CalibrationBins().ece() is None


def test_add_logits_uses_the_softmax_maximum():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    bins = CalibrationBins(4)
    bins.add_logits(logits, torch.tensor([0, 1]))
    p = logits.softmax(-1).max(-1).values
    expected = direct_ece(p.numpy(), np.array([True, False]), 4)
    assert abs(bins.ece() - expected) < 1e-12


def test_evaluate_reports_the_teachers_ece_from_its_cache(tmp_path, tiny_llama_clm):
    # The teacher evaluated on its own top-k cache: its ECE from the full softmax and the ECE read from
    # the cache (top-1 id and its fp16 log-prob) describe the same predictions.
    cache = teacher_cache(tmp_path / "cache", tiny_llama_clm, CLM, shakespeare_lines(30), k=8)
    m = evaluate(tiny_llama_clm, cache)
    assert m["ece"] is not None and m["teacher_ece"] is not None
    assert abs(m["ece"] - m["teacher_ece"]) < 2e-3
