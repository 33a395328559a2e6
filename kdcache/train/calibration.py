"""Expected calibration error (ECE) of next-token predictions, accumulated batch by batch.

Top-label ECE (Guo et al., 2017): positions are binned by the model's confidence (its highest
probability) into equal-width bins; ECE = Σ_b (n_b / n) · |accuracy_b − mean confidence_b|, where
accuracy is whether the argmax is the labelled token. Kept apart from evaluate.py so that the
evaluation only adds one accumulator per model; `evaluate` reports it for the student and, from the
held-out cache alone, for the teacher (its stored most probable id and that id's log-prob).
"""
from __future__ import annotations

import torch

DEFAULT_BINS = 15


class CalibrationBins:
    """Per-bin counts, summed confidences and hits; merge-free and order-independent."""

    def __init__(self, bins: int = DEFAULT_BINS):
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """confidence in [0, 1] and correct (bool) per position, same shape."""
        confidence = confidence.detach().double().reshape(-1).clamp(0.0, 1.0)
        # Bin b holds (b/B, (b+1)/B]; confidence 0 goes to bin 0.
        index = (confidence * self.bins).ceil().long().sub(1).clamp(0, self.bins - 1)
        self.count.index_add_(0, index, torch.ones_like(confidence))
        self.confidence.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, correct.detach().reshape(-1).double())

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A model's top-label confidence and hit from its logits (N, V) and labels (N,)."""
        confidence, predicted = logits.float().softmax(-1).max(-1)
        self.add(confidence, predicted == labels)

    def ece(self) -> float | None:
        n = float(self.count.sum())
        if n == 0:
            return None
        return float((self.confidence - self.correct).abs().sum() / n)
