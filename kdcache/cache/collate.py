"""Turning cache rows into training batches of sparse targets.

A window of rows (an Arrow table) is decoded once into flat numpy arrays (`DecodedRows`);
each batch is then a vectorised gather of its rows from those arrays (no per-row Python, no
Arrow `take` on nested lists), done in the DataLoader workers. A batch holds:

  input_ids, attention_mask (B, L) int64, padded on the right (token_type_ids too, if cached)
  target_rows, target_positions (N,) int64   where the N targets sit in the padded batch
  labels (N,) int64                           hard labels, -1 unknown
  topk_ids (N, k) int32, topk_logprobs (N, k) float16   the teacher's soft targets, as stored
                                              (if decoded); the loss widens them on its device
  Sampled kinds (format v2 "sample", "top-k+sample") put every stored entry in those two, head first
  (the top-k, if any) then the drawn ids, padded to the batch's widest position, and add:
  target_counts (N, W) int16/int32            draws per entry: 0 for head entries and padding
  target_head  int                            how many leading columns are the exact top-k head
  Padding has log-prob -inf (weight 0 in the loss) and id 0.
  example_id (B,) int64, num_rows, num_tokens (real, unpadded tokens)

The soft targets stay narrow (int32 ids: torch has no uint16 gather; fp16 log-probs as cached)
so workers copy and pin half the bytes, and the widening runs on the training device.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ..errors import KdcacheError
from .schema import (
    EXAMPLE_ID, INPUT_IDS, LABELS, POSITIONS, SAMPLE_COUNTS, SAMPLE_IDS, SAMPLE_LENGTHS, SAMPLE_LOGPROBS, TOKEN_TYPE_IDS,
    TOPK_IDS, TOPK_LOGPROBS,
)


def _ragged(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, offsets): row i owns values[offsets[i]:offsets[i + 1]].
    For list<fixed_size_list<T, k>> the values are an (inner lists, k) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)  # slice-aware
    child = array.values  # not slice-aware: the offsets index into all of it
    if pa.types.is_fixed_size_list(child.type):
        k = child.type.list_size
        values = child.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    else:
        values = child.to_numpy(zero_copy_only=False)
    return values, offsets


def _element_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the values of `rows`' elements, in row order; each row's length)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    # element j of a gathered row sits at starts[row] + j: shift a global arange per row.
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift, lengths


class DecodedRows:
    """Rows of one cache, decoded once into flat numpy arrays; `take` gathers any of them."""

    def __init__(self, table: pa.Table, *, soft_targets: bool = True):
        self.num_rows = table.num_rows
        self.example_id = table.column(EXAMPLE_ID).to_numpy().astype(np.int64)
        self.input_ids, self.token_offsets = _ragged(table.column(INPUT_IDS))
        self.token_type_ids = None
        if TOKEN_TYPE_IDS in table.column_names:
            self.token_type_ids, _ = _ragged(table.column(TOKEN_TYPE_IDS))
        # positions, labels and both top-k columns have one entry per target: the same offsets.
        self.positions, self.target_offsets = _ragged(table.column(POSITIONS))
        self.labels, _ = _ragged(table.column(LABELS))
        self.topk_ids = self.topk_logprobs = None
        self.sample_ids = self.sample_logprobs = self.sample_counts = self.entry_offsets = None
        names = table.column_names
        if soft_targets and TOPK_IDS in names:
            self.topk_ids, _ = _ragged(table.column(TOPK_IDS))
            self.topk_logprobs, _ = _ragged(table.column(TOPK_LOGPROBS))
        if soft_targets and SAMPLE_IDS in names:
            # Entries are flat per row; sample_lengths (one per target, numbered like the targets above)
            # gives each target's entries: target j owns entries entry_offsets[j]:entry_offsets[j + 1].
            lengths, _ = _ragged(table.column(SAMPLE_LENGTHS))
            self.entry_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            for attr, name in (("sample_ids", SAMPLE_IDS), ("sample_logprobs", SAMPLE_LOGPROBS),
                               ("sample_counts", SAMPLE_COUNTS)):
                values, row_offsets = _ragged(table.column(name))
                setattr(self, attr, values)
            if not np.array_equal(self.entry_offsets[self.target_offsets], row_offsets):
                raise KdcacheError("a row's sample_lengths do not add up to its sampled entries: the cache is "
                                   "damaged; run `kdcache verify` on it and re-dump the shard it names")

    def take(self, rows: np.ndarray) -> dict:
        """The flat (unpadded) parts of `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens, token_lengths = _element_index(self.token_offsets, rows)
        targets, target_lengths = _element_index(self.target_offsets, rows)
        parts = {"example_id": self.example_id[rows], "input_ids": self.input_ids[tokens],
                 "token_lengths": token_lengths, "positions": self.positions[targets],
                 "labels": self.labels[targets], "target_lengths": target_lengths}
        if self.token_type_ids is not None:
            parts["token_type_ids"] = self.token_type_ids[tokens]
        if self.topk_ids is not None:
            parts["topk_ids"] = self.topk_ids[targets].astype(np.int32)
            parts["topk_logprobs"] = self.topk_logprobs[targets]
        if self.sample_ids is not None:
            entries, parts["sample_lengths"] = _element_index(self.entry_offsets, targets)
            parts["sample_ids"] = self.sample_ids[entries]
            parts["sample_logprobs"] = self.sample_logprobs[entries]
            parts["sample_counts"] = self.sample_counts[entries]
        return parts


def _pad(values: np.ndarray, real: np.ndarray, fill: int) -> np.ndarray:
    """Rows' values (concatenated) into a (rows, width) array; `real` marks the filled slots.
    Boolean assignment fills in row-major order, which is the order the values come in."""
    out = np.full(real.shape, fill, dtype=np.int64)
    out[real] = values
    return out


def _padded_targets(parts: dict) -> dict:
    """Head (top-k, if any) and drawn entries side by side in (N, head + widest draw) arrays."""
    lengths = parts["sample_lengths"]
    head = parts["topk_ids"].shape[1] if "topk_ids" in parts else 0
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    real = np.arange(width)[None, :] < lengths[:, None]
    ids = np.zeros((n, head + width), np.int32)
    logprobs = np.full((n, head + width), -np.inf, np.float16)
    count_dtype = np.int16 if parts["sample_counts"].dtype.itemsize == 1 else np.int32
    counts = np.zeros((n, head + width), count_dtype)
    if head:
        ids[:, :head] = parts["topk_ids"]
        logprobs[:, :head] = parts["topk_logprobs"]
    ids[:, head:][real] = parts["sample_ids"]
    logprobs[:, head:][real] = parts["sample_logprobs"]
    counts[:, head:][real] = parts["sample_counts"]
    return {"topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(logprobs),
            "target_counts": torch.from_numpy(counts), "target_head": head}


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
    if "sample_ids" in parts:
        batch.update(_padded_targets(parts))
    elif "topk_ids" in parts:
        batch["topk_ids"] = torch.from_numpy(parts["topk_ids"])
        batch["topk_logprobs"] = torch.from_numpy(parts["topk_logprobs"])
    batch["example_id"] = torch.from_numpy(parts["example_id"])
    batch["num_rows"] = num_rows
    batch["num_tokens"] = int(token_lengths.sum())
    return batch


def move_batch(batch: dict, device, non_blocking: bool = False) -> dict:
    """Tensors to `device`; plain numbers stay."""
    return {key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
            for key, value in batch.items()}
