"""Kind "top-k+sample" (format v2): the exact top-k head of kinds/topk.py, then N draws from the
teacher's renormalised tail outside it, stored like kinds/sample.py (a position whose teacher has
no probability outside the head has no draws)."""
from __future__ import annotations

from .sample import Sample
from .topk import HEAD_COLUMNS
from .sample import DRAW_COLUMNS, SAMPLE_LENGTHS

NAME = "top-k+sample"


class TopKSample(Sample):
    name = NAME
    head, draws = True, True
    columns = HEAD_COLUMNS + DRAW_COLUMNS
    per_position = HEAD_COLUMNS + (SAMPLE_LENGTHS,)

    def describe(self, k: int, samples: int) -> str:
        return f"top-{k} + {samples} samples"
