"""Turning cache rows into training batches of sparse targets.

A window of rows (an Arrow table) is decoded once into flat numpy arrays (`DecodedRows`);
each batch is then a vectorised gather of its rows from those arrays (no per-row Python, no
Arrow `take` on nested lists), done in the DataLoader workers. A batch holds:

  input_ids, attention_mask (B, L) int64, padded on the right (token_type_ids too, if cached)
  target_rows, target_positions (N,) int64   where the N targets sit in the padded batch
  labels (N,) int64                           hard labels, -1 unknown
  and the target kind's tensors (its `decode` / `batch` in kdcache/cache/kinds/), if decoded:
  target_ids (N, k) int32, target_logprobs (N, k) float16  the teacher's soft targets, as stored;
                                              the loss widens them on its device
  Sampled kinds (format v2 "sample", "top-k+sample") put every stored entry in those two, head first
  (the top-k, if any) then the drawn ids, padded to the batch's widest position, and add:
  target_counts (N, W) int16/int32            draws per entry: 0 for head entries and padding
  target_head  int                            how many leading columns are the exact top-k head
  Padding has log-prob -inf (weight 0 in the loss) and id 0.
  Selected caches (format v3, `dump-logits --select-positions`) add
  soft_mask (N,) bool                         True where the target has soft targets; the kind's tensors
                                              still have N rows, an unselected one all padding (the loss
                                              trains it on its label alone; DistillLoss.selection)
  example_id (B,) int64, num_rows, num_tokens (real, unpadded tokens)

The soft targets stay narrow (int32 ids: torch has no uint16 gather; fp16 log-probs as cached)
so workers copy and pin half the bytes, and the widening runs on the training device.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .kinds import TargetKind, kind_for_columns
from .kinds.base import TARGET_COUNTS, TARGET_IDS, TARGET_LOGPROBS, element_index, ragged
from .schema import EXAMPLE_ID, INPUT_IDS, LABELS, POSITIONS, SOFT_MASK, TOKEN_TYPE_IDS

# The kind tensors with one row per target (kinds' `batch`), and what an unselected target's row holds.
SOFT_PADDING = {TARGET_IDS: 0, TARGET_LOGPROBS: float("-inf"), TARGET_COUNTS: 0}


class DecodedRows:
    """Rows of one cache, decoded once into flat numpy arrays; `take` gathers any of them."""

    def __init__(self, table: pa.Table, *, soft_targets: bool = True, kind: TargetKind | None = None):
        """kind: the cache's target kind (by default the one whose columns the table holds)."""
        self.num_rows = table.num_rows
        self.example_id = table.column(EXAMPLE_ID).to_numpy().astype(np.int64)
        self.input_ids, self.token_offsets = ragged(table.column(INPUT_IDS))
        self.token_type_ids = None
        if TOKEN_TYPE_IDS in table.column_names:
            self.token_type_ids, _ = ragged(table.column(TOKEN_TYPE_IDS))
        # positions, labels (and a kind's per-position columns) have one entry per target: the same offsets.
        self.positions, self.target_offsets = ragged(table.column(POSITIONS))
        self.labels, _ = ragged(table.column(LABELS))
        # The target kind's columns (kdcache/cache/kinds/), decoded by the kind; None without them.
        self.kind = (kind or kind_for_columns(table.column_names)) if soft_targets else None
        self.soft_mask = self.soft_index = None
        soft_offsets = self.target_offsets
        if self.kind is not None and SOFT_MASK in table.column_names:
            # A selected cache: the kind's columns hold the soft_mask=True targets only; soft_index[j] is
            # target j's place among them (-1 where unselected), soft_offsets each row's first one.
            self.soft_mask, _ = ragged(table.column(SOFT_MASK))
            self.soft_mask = self.soft_mask.astype(bool)
            counted = np.concatenate([[0], np.cumsum(self.soft_mask, dtype=np.int64)])
            self.soft_index = np.where(self.soft_mask, counted[1:] - 1, -1)
            soft_offsets = counted[self.target_offsets]
        self.targets = self.kind.decode(table, soft_offsets) if self.kind is not None else None

    def take(self, rows: np.ndarray) -> dict:
        """The flat (unpadded) parts of `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens, token_lengths = element_index(self.token_offsets, rows)
        targets, target_lengths = element_index(self.target_offsets, rows)
        parts = {"example_id": self.example_id[rows], "input_ids": self.input_ids[tokens],
                 "token_lengths": token_lengths, "positions": self.positions[targets],
                 "labels": self.labels[targets], "target_lengths": target_lengths}
        if self.token_type_ids is not None:
            parts["token_type_ids"] = self.token_type_ids[tokens]
        if self.targets is not None:
            if self.soft_mask is None:
                parts.update(self.targets.take(targets))
            else:
                mask = self.soft_mask[targets]
                parts.update(self.targets.take(self.soft_index[targets][mask]))
                parts["soft_mask"] = mask
        return parts


def _pad(values: np.ndarray, real: np.ndarray, fill: int) -> np.ndarray:
    """Rows' values (concatenated) into a (rows, width) array; `real` marks the filled slots.
    Boolean assignment fills in row-major order, which is the order the values come in."""
    out = np.full(real.shape, fill, dtype=np.int64)
    out[real] = values
    return out


def collate(pieces: list[tuple[DecodedRows, np.ndarray]], *, pad_id: int = 0) -> dict:
    """One batch from (decoded rows, row indices) pieces, concatenated in order (a batch
    spans two pieces only where it straddles a shuffle window)."""
    taken = [decoded.take(rows) for decoded, rows in pieces]
    parts = taken[0] if len(taken) == 1 else {key: np.concatenate([t[key] for t in taken]) for key in taken[0]}
    token_lengths, target_lengths = parts["token_lengths"], parts["target_lengths"]
    num_rows = len(token_lengths)
    width = int(token_lengths.max()) if num_rows else 0
    real = np.arange(width)[None, :] < token_lengths[:, None]  # right padding
    batch = {
        "input_ids": torch.from_numpy(_pad(parts["input_ids"], real, pad_id)),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
    }
    if "token_type_ids" in parts:
        batch["token_type_ids"] = torch.from_numpy(_pad(parts["token_type_ids"], real, 0))
    batch["target_rows"] = torch.from_numpy(np.repeat(np.arange(num_rows, dtype=np.int64), target_lengths))
    batch["target_positions"] = torch.from_numpy(parts["positions"].astype(np.int64))
    batch["labels"] = torch.from_numpy(parts["labels"].astype(np.int64))
    kind = pieces[0][0].kind
    if kind is not None:
        soft = kind.batch(parts)
        if "soft_mask" in parts:
            soft = _spread(soft, parts["soft_mask"])
            batch["soft_mask"] = torch.from_numpy(parts["soft_mask"])
        batch.update(soft)
    batch["example_id"] = torch.from_numpy(parts["example_id"])
    batch["num_rows"] = num_rows
    batch["num_tokens"] = int(token_lengths.sum())
    return batch


def _spread(soft: dict, mask: np.ndarray) -> dict:
    """The kind's tensors for the selected targets (rows of `mask` that are True) as N-row tensors,
    unselected rows padded as in SOFT_PADDING (log-prob -inf: weight 0; the loss masks them anyway)."""
    rows = np.flatnonzero(mask)
    out = dict(soft)
    for key, fill in SOFT_PADDING.items():
        if key in soft:
            # In numpy: torch's fill and masked assignment of float16/int16 on the CPU are ~10x slower.
            value = soft[key].numpy()
            full = np.full((len(mask), *value.shape[1:]), fill, dtype=value.dtype)
            full[rows] = value
            out[key] = torch.from_numpy(full)
    return out


def move_batch(batch: dict, device, non_blocking: bool = False) -> dict:
    """Tensors to `device`; plain numbers stay."""
    return {key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
            for key, value in batch.items()}
