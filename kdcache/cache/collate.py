"""Turning a slice of cache rows (an Arrow table) into one training batch of sparse targets.

Vectorised over Arrow buffers (no per-row Python), so it runs at memory speed inside the
DataLoader workers. A batch holds:

  input_ids, attention_mask (B, L) int64, padded on the right (token_type_ids too, if cached)
  target_rows, target_positions (N,) int64   where the N targets sit in the padded batch
  labels (N,) int64                           hard labels, -1 unknown
  topk_ids (N, k) int64, topk_logprobs (N, k) float32   teacher's soft targets (if decoded)
  example_id (B,) int64, num_rows, num_tokens (real, unpadded tokens)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .schema import EXAMPLE_ID, INPUT_IDS, LABELS, POSITIONS, TOKEN_TYPE_IDS, TOPK_IDS, TOPK_LOGPROBS


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, parent row of each value, index of each value within its row) of a list column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten()
    rows = pc.list_parent_indices(array).to_numpy()
    lengths = pc.list_value_length(array).fill_null(0).to_numpy().astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(rows), dtype=np.int64) - starts[rows]
    return values, rows.astype(np.int64), within


def _fixed_lists(column: pa.ChunkedArray) -> np.ndarray:
    """A list<fixed_size_list<T, k>> column as one (N, k) numpy array (N = all inner lists)."""
    array = column.combine_chunks()
    inner = array.flatten()  # fixed_size_list<T, k>, offset-aware
    k = inner.type.list_size
    return inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)


def _pad(values: np.ndarray, rows: np.ndarray, within: np.ndarray, shape: tuple[int, int], fill: int) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.int64)
    out[rows, within] = values
    return out


def collate_rows(table: pa.Table, *, pad_id: int = 0, soft_targets: bool = True) -> dict:
    """One batch from `table` (rows of one cache). soft_targets=False skips decoding the
    teacher's top-k entirely (hard-label-only or online-teacher training)."""
    num_rows = table.num_rows
    ids, id_rows, id_within = _list_parts(table.column(INPUT_IDS))
    lengths = np.bincount(id_rows, minlength=num_rows)
    max_len = int(lengths.max()) if num_rows else 0
    shape = (num_rows, max_len)
    batch = {
        "input_ids": torch.from_numpy(_pad(ids.to_numpy(zero_copy_only=False), id_rows, id_within, shape, pad_id)),
        "attention_mask": torch.from_numpy((np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int64)),
    }
    if TOKEN_TYPE_IDS in table.column_names:
        tt, tt_rows, tt_within = _list_parts(table.column(TOKEN_TYPE_IDS))
        batch["token_type_ids"] = torch.from_numpy(_pad(tt.to_numpy(zero_copy_only=False), tt_rows, tt_within, shape, 0))
    positions, target_rows, _ = _list_parts(table.column(POSITIONS))
    labels, _, _ = _list_parts(table.column(LABELS))
    batch["target_rows"] = torch.from_numpy(target_rows)
    batch["target_positions"] = torch.from_numpy(positions.to_numpy(zero_copy_only=False).astype(np.int64))
    batch["labels"] = torch.from_numpy(labels.to_numpy(zero_copy_only=False).astype(np.int64))
    if soft_targets:
        batch["topk_ids"] = torch.from_numpy(_fixed_lists(table.column(TOPK_IDS)).astype(np.int64))
        batch["topk_logprobs"] = torch.from_numpy(_fixed_lists(table.column(TOPK_LOGPROBS)).astype(np.float32))
    batch["example_id"] = torch.from_numpy(table.column(EXAMPLE_ID).to_numpy().astype(np.int64))
    batch["num_rows"] = num_rows
    batch["num_tokens"] = int(lengths.sum())
    return batch


def move_batch(batch: dict, device, non_blocking: bool = False) -> dict:
    """Tensors to `device`; plain numbers stay."""
    return {key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
            for key, value in batch.items()}
