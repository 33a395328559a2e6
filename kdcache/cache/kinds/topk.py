"""Kind "top-k": per position the teacher's k most probable ids and their log-probs (T = 1),
most probable first. Its columns are also the exact head of "top-k+sample" (kinds/topk_sample.py),
which uses the `head_*` functions here."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import TARGET_IDS, TARGET_LOGPROBS, TargetKind, check_logprobs, concat, flat, offsets_array, ragged

NAME = "top-k"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
HEAD_COLUMNS = (TOPK_IDS, TOPK_LOGPROBS)


def head_fields(k: int, target: pa.DataType) -> list[pa.Field]:
    return [pa.field(TOPK_IDS, pa.list_(pa.list_(target, k)), nullable=False),
            pa.field(TOPK_LOGPROBS, pa.list_(pa.list_(pa.float16(), k)), nullable=False)]


def encode_head(results: list, n_pos: list[int], field, k: int) -> dict[str, pa.Array]:
    """results[i][1], results[i][2]: the row's (n, k) ids and float16 log-probs."""
    ids_type, lp_type = field(TOPK_IDS).type, field(TOPK_LOGPROBS).type
    ids = pa.array(concat([r[1].reshape(-1) for r in results], np.int64), type=ids_type.value_type.value_type)
    lps = pa.array(concat([r[2].reshape(-1) for r in results], np.float16), type=pa.float16())
    offsets = offsets_array(n_pos)  # the same for both columns: built once (pyarrow arrays are immutable)
    return {TOPK_IDS: pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(ids, k), type=ids_type),
            TOPK_LOGPROBS: pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(lps, k), type=lp_type)}


def head_ids(table: pa.Table, manifest) -> tuple[str | None, np.ndarray | None]:
    """(problem, the (positions, k) head ids) of a table holding topk_ids (else (None, None))."""
    if TOPK_IDS not in table.column_names:
        return None, None
    ids = flat(table.column(TOPK_IDS), 2)
    if ids.size and int(ids.max()) >= manifest.target_vocab_size:
        return f"top-k id {int(ids.max())} >= target_vocab_size {manifest.target_vocab_size}", None
    return None, ids.reshape(-1, manifest.k)


def verify_head(table: pa.Table, manifest) -> tuple[str | None, np.ndarray | None]:
    """head_ids, plus log-probs finite, <= 0 and sorted (most probable first)."""
    problem, ids = head_ids(table, manifest)
    if problem:
        return problem, None
    logprobs = flat(table.column(TOPK_LOGPROBS), 2)
    problem = check_logprobs(logprobs, "top-k")
    if problem:
        return problem, None
    if logprobs.size and (np.diff(logprobs.reshape(-1, manifest.k).astype(np.float32), axis=1) > 0).any():
        return "top-k log-probs are not sorted in descending order", None
    return None, ids


def decode_head(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs), (positions, k) each, numbered like the table's target positions."""
    return ragged(table.column(TOPK_IDS))[0], ragged(table.column(TOPK_LOGPROBS))[0]


def head_stats(table: pa.Table, k: int) -> tuple[float, int, np.ndarray]:
    """(probability mass of the head summed over positions, stored ids, top-1 per position)."""
    lp = flat(table.column(TOPK_LOGPROBS), 2).astype(np.float64).reshape(-1, k)
    ids = flat(table.column(TOPK_IDS), 2).reshape(-1, k)
    return float(np.exp(lp).sum()), lp.size, ids[:, 0].astype(np.int64)


class _Decoded:
    def __init__(self, table: pa.Table):
        self.ids, self.logprobs = decode_head(table)

    def take(self, targets: np.ndarray) -> dict:
        return {"head_ids": self.ids[targets].astype(np.int32), "head_logprobs": self.logprobs[targets]}


class TopK(TargetKind):
    name = NAME
    head, draws = True, False
    columns = HEAD_COLUMNS
    per_position = HEAD_COLUMNS

    def describe(self, k: int, samples: int) -> str:
        return f"top-{k}"

    def raw_bytes(self, k: int, samples: int, id_bytes: int, target_vocab_size: int) -> int:
        return k * (id_bytes + 2)  # id + fp16 log-prob each

    def fields(self, *, k: int, samples: int, target: pa.DataType) -> list[pa.Field]:
        return head_fields(k, target)

    def encode(self, results: list, n_pos: list[int], field, k: int) -> dict[str, pa.Array]:
        return encode_head(results, n_pos, field, k)

    def read_check(self, table: pa.Table, manifest, n_pos: np.ndarray | None = None) -> str | None:
        return head_ids(table, manifest)[0]

    def verify(self, table: pa.Table, manifest, n_pos: np.ndarray) -> str | None:
        return verify_head(table, manifest)[0]

    def decode(self, table: pa.Table, target_offsets: np.ndarray) -> _Decoded:
        return _Decoded(table)

    def batch(self, parts: dict) -> dict:
        import torch  # imported here: the schema (and so this module) loads without torch
        return {TARGET_IDS: torch.from_numpy(parts["head_ids"]), TARGET_LOGPROBS: torch.from_numpy(parts["head_logprobs"])}

    def weights(self, logprobs, counts, head: int, temperature: float):
        """The renormalised top-k: w = softmax(logprobs / T); log_p = log w (0 where w = 0)."""
        import torch
        lp = logprobs.float() if logprobs.dtype != torch.float64 else logprobs
        log_w = (lp / temperature).log_softmax(-1)
        w = log_w.exp()
        return w, torch.where(w > 0, log_w, torch.zeros_like(log_w))  # 0 · log 0 = 0

    def stats(self, table: pa.Table, k: int, totals: dict) -> np.ndarray | None:
        mass, entries, top1 = head_stats(table, k)
        totals["head_mass"] += mass
        totals["stored_mass"] += mass
        totals["entries"] += entries
        return top1
