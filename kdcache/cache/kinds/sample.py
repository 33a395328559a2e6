"""Kind "sample" (format v2): per position the distinct ids drawn N times with replacement from the
teacher's softmax (T = 1), the teacher's log-prob at each and how many draws hit it, most probable
first. Flat per row (all its positions' entries in one list, position by position) with the entries
per position in `sample_lengths`: decodes 1.43x faster than nested lists (benchmarks/sample_layouts.py).

"top-k+sample" (kinds/topk_sample.py) is this kind with the exact top-k head of kinds/topk.py in
front, its draws taken from the tail outside the head: `head = True` switches that on here.

`dump-logits --no-draw-logprobs` (format v3, manifest targets "draw_logprobs": false) leaves out
sample_logprobs: training at T = 1 needs only the counts (see empirical_logprobs).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...errors import KdcacheError
from . import topk
from .base import (TARGET_COUNTS, TARGET_HEAD, TARGET_IDS, TARGET_LOGPROBS, TargetKind, check_logprobs, concat,
                   element_index, flat, list_array, ragged, smallest_uint)

NAME = "sample"
SAMPLE_LENGTHS = "sample_lengths"
SAMPLE_IDS = "sample_ids"
SAMPLE_LOGPROBS = "sample_logprobs"
SAMPLE_COUNTS = "sample_counts"
SAMPLE_ENTRY_COLUMNS = (SAMPLE_IDS, SAMPLE_LOGPROBS, SAMPLE_COUNTS)  # flat per row; the rest: one per position
DRAW_COLUMNS = (SAMPLE_LENGTHS,) + SAMPLE_ENTRY_COLUMNS


def draw_fields(samples: int, target: pa.DataType) -> list[pa.Field]:
    # Variable length per position (as many entries as distinct ids were drawn, 0..samples), so the
    # entries are flat per row and sample_lengths (one per position) says which belong to which.
    count = smallest_uint(samples)
    return [pa.field(SAMPLE_LENGTHS, pa.list_(count), nullable=False),
            pa.field(SAMPLE_IDS, pa.list_(target), nullable=False),
            pa.field(SAMPLE_LOGPROBS, pa.list_(pa.float16()), nullable=False),
            pa.field(SAMPLE_COUNTS, pa.list_(count), nullable=False)]


def encode_draws(results: list, n_pos: list[int], field) -> dict[str, pa.Array]:
    """results[i][3]: the row's (entries per position, ids, log-probs, counts), flat over its entries;
    log-probs None: a --no-draw-logprobs dump, whose schema has no sample_logprobs."""
    columns = {SAMPLE_LENGTHS: list_array(n_pos, concat([r[3][0] for r in results], np.int64), field(SAMPLE_LENGTHS).type)}
    row_entries = [len(r[3][1]) for r in results]
    for i, (name, dtype) in enumerate(((SAMPLE_IDS, np.int64), (SAMPLE_LOGPROBS, np.float16),
                                      (SAMPLE_COUNTS, np.int64)), start=1):
        if results and results[0][3][i] is None:
            continue
        columns[name] = list_array(row_entries, concat([r[3][i] for r in results], dtype), field(name).type)
    return columns


def pack_draws(ids: np.ndarray, logprobs: np.ndarray | None, counts: np.ndarray) -> tuple[np.ndarray, tuple]:
    """The teacher runner's padded (targets, samples) draws (entries packed to the left, empty slots
    count 0) as (entries per target, (ids, log-probs, counts) flat over the targets' entries);
    log-probs None (not copied from the device: --no-draw-logprobs) stays None."""
    present = counts > 0
    return present.sum(1), (ids[present], None if logprobs is None else logprobs[present], counts[present])


def empirical_logprobs(counts: np.ndarray, entry_offsets: np.ndarray, head_logprobs: np.ndarray | None) -> np.ndarray:
    """What decode puts in place of the draws' log-probs when a cache has none (--no-draw-logprobs):
    each entry's own loss weight at T = 1, in logs: log(count / N) (top-k+sample: log((1 - head mass) *
    count / N)), fp16 like the column. At T = 1 the weights (kinds' `weights`) do not read a drawn
    entry's log-prob, so training is identical; only the KD value reported becomes the KL from this
    empirical distribution instead of an estimate of the KL from the teacher's.
    entry_offsets: target j owns entries entry_offsets[j]:entry_offsets[j + 1]."""
    lengths = np.diff(entry_offsets)
    drawn = np.flatnonzero(lengths)
    if not len(drawn):
        return np.zeros(len(counts), np.float16)
    # Every position with draws has counts summing to N (read_check): log(c / N) is a table lookup by c,
    # 4x faster than a log per entry (the loader runs this on every row group).
    first = drawn[0]
    n = int(counts[entry_offsets[first]:entry_offsets[first + 1]].sum(dtype=np.int64))
    log_share = np.log(np.maximum(np.arange(n + 1), 1) / n)  # index c: log(c / N) (c = 0 never occurs)
    if head_logprobs is None:
        return log_share.astype(np.float16)[counts]
    # The head's mass in fp32 from its fp16 log-probs, as the loss computes it; a tail rounded to <= 0
    # weighs nothing there, any finite value stands in for it here.
    tail = 1 - np.exp(head_logprobs.astype(np.float32)).sum(-1, dtype=np.float32)
    log_tail = np.log(np.maximum(tail, np.finfo(np.float32).tiny))
    return (log_share.astype(np.float32)[counts] + np.repeat(log_tail, lengths)).astype(np.float16)


def check_draws(table: pa.Table, manifest, head_ids: np.ndarray | None, n_pos: np.ndarray,
                empty_allowed: bool) -> str | None:
    """The sampled columns: each row's sample_lengths add up to its entries in all three, counts >= 1
    summing to N per position, distinct ids per position (and none of the top-k head's), ids in range,
    log-probs finite and <= 0. empty_allowed: a position may have no draws (top-k+sample: a teacher
    with no probability outside the head has no tail to draw)."""
    # Vectorised over the row group (cumulative sums, one sort of short rows): readers run this on every
    # row group; see BENCHMARKS.md for its share of the loader's time.
    entries = flat(table.column(SAMPLE_LENGTHS), 1).astype(np.int64)  # per position
    ends = np.cumsum(entries)
    at_rows = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(n_pos)])]
    row_entries = np.diff(at_rows)
    for name in SAMPLE_ENTRY_COLUMNS:
        if name not in table.column_names:  # sample_logprobs of a --no-draw-logprobs cache
            continue
        if not np.array_equal(pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False), row_entries):
            return f"{name} does not have sum(sample_lengths) entries in every row"
    ids = flat(table.column(SAMPLE_IDS), 1)  # unsigned, as stored: widened only where needed
    counts = flat(table.column(SAMPLE_COUNTS), 1)
    if ids.size and int(ids.max()) >= manifest.target_vocab_size:
        return f"sampled id {int(ids.max())} >= target_vocab_size {manifest.target_vocab_size}"
    if counts.size and int(counts.min()) < 1:
        return "a sampled id has draw count 0"
    counted = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    sums = counted[ends] - counted[ends - entries]
    ok = (sums == manifest.samples) | ((sums == 0) & empty_allowed)
    if len(entries) and not np.all(ok):
        bad = int(np.argmax(~ok))
        return f"draw counts sum to {int(sums[bad])} at a position, not samples = {manifest.samples}"
    # One check for both rules (distinct draws, none of them a head id): the common case, passing, sorts once.
    if _repeats_an_id(entries, ids, manifest.target_vocab_size, head_ids):
        # Failing: which rule (a slow path, taken once per damaged row group).
        if _repeats_an_id(entries, ids, manifest.target_vocab_size):
            return "an id appears twice among one position's sampled ids"
        if _repeats_an_id(np.full(len(head_ids), head_ids.shape[1]), head_ids.reshape(-1), manifest.target_vocab_size):
            return "an id appears twice among one position's top-k ids"
        return "a sampled id repeats one of its position's top-k ids (the tail excludes the head)"
    if SAMPLE_LOGPROBS not in table.column_names:
        return None
    return check_logprobs(flat(table.column(SAMPLE_LOGPROBS), 1), "sampled")


def _repeats_an_id(entries: np.ndarray, ids: np.ndarray, size: int, head: np.ndarray | None = None) -> bool:
    """Whether some position has an id twice among its entries, or (head: its (positions, k) top-k ids)
    among its entries and head ids together (ids < size, checked before)."""
    width = int(entries.max()) if len(entries) else 0
    k = head.shape[1] if head is not None else 0
    if width * len(entries) <= 4 * len(ids) + 4096:
        # Dense enough: pad to (positions, head + widest) with -1 and sort each short row; a repeat is an
        # equal neighbour. 2.3x faster than sorting one global key per entry (N = 16, 32k positions a group);
        # the head in the same rows replaces a second (entries x k) comparison of each draw with its head.
        real = np.arange(width)[None, :] < entries[:, None]
        padded = np.full((len(entries), k + width), -1, np.int32 if size < 2**31 else np.int64)
        if k:
            padded[:, :k] = head
        padded[:, k:][real] = ids
        padded.sort(axis=1)
        return bool(((padded[:, 1:] == padded[:, :-1]) & (padded[:, 1:] >= 0)).any())
    # A few very wide positions: position * size + id is one int64 key per (position, id) pair;
    # a repeated pair is an equal neighbour once sorted.
    position = np.repeat(np.arange(len(entries)), entries)
    keys = position * size + ids.astype(np.int64)
    if k:
        keys = np.concatenate([keys, (np.arange(len(entries))[:, None] * size + head.astype(np.int64)).reshape(-1)])
    keys = np.sort(keys)
    return bool(np.any(keys[1:] == keys[:-1]))


class _Decoded:
    def __init__(self, table: pa.Table, target_offsets: np.ndarray, head: bool):
        self.head = topk.decode_head(table) if head else None
        # Entries are flat per row; sample_lengths (one per target, numbered like the targets)
        # gives each target's entries: target j owns entries entry_offsets[j]:entry_offsets[j + 1].
        lengths, _ = ragged(table.column(SAMPLE_LENGTHS))
        self.entry_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.ids, row_offsets = ragged(table.column(SAMPLE_IDS))
        self.counts, row_offsets = ragged(table.column(SAMPLE_COUNTS))
        if not np.array_equal(self.entry_offsets[target_offsets], row_offsets):
            raise KdcacheError("a row's sample_lengths do not add up to its sampled entries: the cache is "
                               "damaged; run `kdcache verify` on it and re-dump the shard it names")
        if SAMPLE_LOGPROBS in table.column_names:
            self.logprobs, _ = ragged(table.column(SAMPLE_LOGPROBS))
        else:  # --no-draw-logprobs: a stand-in that trains identically at T = 1 (see empirical_logprobs)
            self.logprobs = empirical_logprobs(self.counts, self.entry_offsets,
                                               None if self.head is None else self.head[1])

    def take(self, targets: np.ndarray) -> dict:
        parts = {}
        if self.head is not None:
            parts["head_ids"] = self.head[0][targets].astype(np.int32)
            parts["head_logprobs"] = self.head[1][targets]
        entries, parts["sample_lengths"] = element_index(self.entry_offsets, targets)
        parts["sample_ids"] = self.ids[entries]
        parts["sample_logprobs"] = self.logprobs[entries]
        parts["sample_counts"] = self.counts[entries]
        return parts


class Sample(TargetKind):
    name = NAME
    head, draws = False, True
    columns = DRAW_COLUMNS
    per_position = (SAMPLE_LENGTHS,)
    draw_logprob_columns = (SAMPLE_LOGPROBS,)

    def describe(self, k: int, samples: int) -> str:
        return f"{samples} samples"

    def raw_bytes(self, k: int, samples: int, id_bytes: int, target_vocab_size: int, draw_logprobs: bool = True) -> int:
        # Upper bound: every draw a distinct id (id + fp16 log-prob + count each; no log-prob with
        # draw_logprobs=False), plus the entries per position (sample_lengths). A confident teacher
        # draws far fewer distinct ids.
        count_bytes = smallest_uint(samples).bit_width // 8
        head = k * (id_bytes + 2) if self.head else 0
        entry = id_bytes + (2 if draw_logprobs else 0) + count_bytes
        return head + min(samples, target_vocab_size - k) * entry + count_bytes

    def fields(self, *, k: int, samples: int, target: pa.DataType) -> list[pa.Field]:
        return (topk.head_fields(k, target) if self.head else []) + draw_fields(samples, target)

    def encode(self, results: list, n_pos: list[int], field, k: int) -> dict[str, pa.Array]:
        return {**(topk.encode_head(results, n_pos, field, k) if self.head else {}), **encode_draws(results, n_pos, field)}

    def read_check(self, table: pa.Table, manifest, n_pos: np.ndarray | None = None) -> str | None:
        problem, head_ids = topk.head_ids(table, manifest)
        if problem or SAMPLE_IDS not in table.column_names:
            return problem
        return check_draws(table, manifest, head_ids, n_pos, empty_allowed=self.head)

    def verify(self, table: pa.Table, manifest, n_pos: np.ndarray) -> str | None:
        head_ids = None
        if self.head:
            problem, head_ids = topk.verify_head(table, manifest)
            if problem:
                return problem
        return check_draws(table, manifest, head_ids, n_pos, empty_allowed=self.head)

    def decode(self, table: pa.Table, target_offsets: np.ndarray) -> _Decoded:
        return _Decoded(table, target_offsets, self.head)

    def batch(self, parts: dict) -> dict:
        """Head (top-k, if any) and drawn entries side by side in (N, head + widest draw) arrays:
        target_ids int32, target_logprobs float16 (padding -inf, id 0), target_counts (draws per entry, 0
        for head and padding) and target_head (how many leading columns are the exact head)."""
        import torch  # imported here: the schema (and so this module) loads without torch
        lengths = parts["sample_lengths"]
        head = parts["head_ids"].shape[1] if "head_ids" in parts else 0
        n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
        real = np.arange(width)[None, :] < lengths[:, None]
        ids = np.zeros((n, head + width), np.int32)
        logprobs = np.full((n, head + width), -np.inf, np.float16)
        count_dtype = np.int16 if parts["sample_counts"].dtype.itemsize == 1 else np.int32
        counts = np.zeros((n, head + width), count_dtype)
        if head:
            ids[:, :head] = parts["head_ids"]
            logprobs[:, :head] = parts["head_logprobs"]
        ids[:, head:][real] = parts["sample_ids"]
        logprobs[:, head:][real] = parts["sample_logprobs"]
        counts[:, head:][real] = parts["sample_counts"]
        return {TARGET_IDS: torch.from_numpy(ids), TARGET_LOGPROBS: torch.from_numpy(logprobs),
                TARGET_COUNTS: torch.from_numpy(counts), TARGET_HEAD: head}

    def weights(self, logprobs, counts, head: int, temperature: float):
        """w_j ∝ count_j · p_j^(1/T - 1) (T = 1: count_j / N); with a head of exact top-k entries,
        head w_i ∝ p_i^(1/T) and drawn w_j ∝ (1 - Σ_head p) · count_j/N · p_j^(1/T - 1).
        log_p: the (estimated) teacher log-prob at T (0 on padding, where w = 0)."""
        import torch
        lp = logprobs.float() if logprobs.dtype != torch.float64 else logprobs
        valid = lp > float("-inf")
        counts = counts.to(lp.dtype)
        draws = counts.sum(-1, keepdim=True).clamp(min=1)
        inv = 1.0 / temperature
        if head > 0:
            # fp16 rounding may push the head's mass a hair past 1: then the tail simply gets none.
            tail = (1 - lp[:, :head].exp().sum(-1, keepdim=True)).clamp(min=0)
        else:
            tail = torch.ones_like(draws)
        drawn = tail.log() + (counts / draws).log() + lp * (inv - 1)
        is_head = torch.arange(lp.shape[1], device=lp.device) < head
        log_u = torch.where(is_head, lp * inv, drawn).masked_fill(~valid, float("-inf"))
        log_z = log_u.logsumexp(-1, keepdim=True)  # = 0 at T = 1 (up to fp16 rounding of the head)
        w = (log_u - log_z).exp()
        log_p = torch.where(valid, lp * inv - log_z, torch.zeros_like(lp))
        return w, log_p

    def stats(self, table: pa.Table, k: int, totals: dict) -> np.ndarray | None:
        top1 = None
        if self.head:
            mass, entries, top1 = topk.head_stats(table, k)
            totals["head_mass"] += mass
            totals["stored_mass"] += mass
            totals["entries"] += entries
        lengths = flat(table.column(SAMPLE_LENGTHS), 1).astype(np.int64)
        if SAMPLE_LOGPROBS in table.column_names:
            totals["stored_mass"] += float(np.exp(flat(table.column(SAMPLE_LOGPROBS), 1).astype(np.float64)).sum())
        else:  # --no-draw-logprobs: the drawn ids' mass is not stored (the head's, above, still is)
            totals["stored_mass"] = float("nan")
        totals["entries"] += int(lengths.sum())
        if not self.head and len(lengths):  # entries are stored most probable first; every position has one
            firsts = np.cumsum(lengths) - lengths
            top1 = flat(table.column(SAMPLE_IDS), 1)[firsts].astype(np.int64)
        return top1
