"""What every target kind provides, and the helpers their columns share.

A target kind (manifest["targets"]["kind"]) is one class that owns everything kind-specific:
its Arrow fields, its encoding at dump time (host arrays from the teacher runner to Arrow), its
checks (`verify` and the read-time checks every reader runs), its decoding to batch tensors and
from those to per-id loss weights, its `inspect` numbers and its one-line description.
Everything else (schema, verify, stream, collate, writer, losses, stats) asks the registry in
kdcache.cache.kinds, so adding a kind is one module plus one registry line.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


# The batch keys of soft targets (what a kind's `batch` returns; kdcache.cache.collate documents the batch).
# They name what they hold for every kind: the stored target ids, head (exact top-k) first, then drawn ids.
# (Before 0.2 they were called topk_ids / topk_logprobs for every kind, drawn ids included.)
TARGET_IDS = "target_ids"            # (N, W) int32
TARGET_LOGPROBS = "target_logprobs"  # (N, W) float16, -inf on padding
TARGET_COUNTS = "target_counts"      # (N, W) draws per entry, drawn kinds only (0 on head and padding)
TARGET_HEAD = "target_head"          # int: how many leading columns are the exact top-k head
TARGET_KEYS = (TARGET_IDS, TARGET_LOGPROBS, TARGET_COUNTS, TARGET_HEAD)


def smallest_uint(max_value: int) -> pa.DataType:
    """Smallest unsigned Arrow integer type holding 0..max_value."""
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    for bits, typ in ((8, pa.uint8()), (16, pa.uint16()), (32, pa.uint32())):
        if max_value < 2**bits:
            return typ
    return pa.uint64()


def id_type(vocab_size: int) -> pa.DataType:
    """Type of token ids (input_ids) and of target ids: smallest that holds vocab_size - 1."""
    return smallest_uint(max(vocab_size - 1, 0))


def flat(column, depth: int) -> np.ndarray:
    """Values of a (nested) list column as one numpy array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def ragged(column) -> tuple[np.ndarray, np.ndarray]:
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


def element_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the values of `rows`' elements, in row order; each row's length)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    # element j of a gathered row sits at starts[row] + j: shift a global arange per row.
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift, lengths


def offsets_array(lengths) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32), pa.int32())


def list_array(lengths, values: np.ndarray, list_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(offsets_array(lengths), pa.array(values, type=list_type.value_type), type=list_type)


def concat(arrays, dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def check_logprobs(logprobs: np.ndarray, what: str) -> str | None:
    logprobs = logprobs.astype(np.float32)
    if not np.isfinite(logprobs).all():
        return f"non-finite {what} log-probs"
    if logprobs.size and logprobs.max() > 0:
        return f"{what} log-prob {logprobs.max()} > 0"
    return None


class TargetKind:
    """One target kind. Subclasses set the class attributes and implement the methods.

    The dump side hands `encode` one result per row: (Row, head ids (n, k) | None,
    head log-probs (n, k) | None[, (entries per position (n,), ids, log-probs, counts)]), the last
    flat over the row's positions; `head` / `draws` tell the teacher runner which of the two
    device computations (exact top-k, draws from the softmax) the kind needs.

    The train side: `decode(table)` returns an object whose `take(targets)` gathers the flat parts
    of some targets, and `batch(parts)` turns gathered parts into the batch's target tensors
    (target_ids / target_logprobs and, for drawn targets, target_counts / target_head);
    `weights` turns those into per-id loss weights.
    """
    name: str = ""
    head: bool = False    # stores the teacher's exact top-k (manifest k columns wide)
    draws: bool = False   # stores ids drawn from the teacher's softmax (manifest samples per position)
    columns: tuple[str, ...] = ()        # its soft-target columns, in file order
    per_position: tuple[str, ...] = ()   # those with exactly one entry per target position
    # Those `dump-logits --no-draw-logprobs` leaves out (manifest targets "draw_logprobs": false, format v3):
    # the per-draw log-probs, which training at T = 1 does not need (its weights come from the counts).
    draw_logprob_columns: tuple[str, ...] = ()

    def stored_columns(self, draw_logprobs: bool = True) -> tuple[str, ...]:
        """The columns a cache of this kind has: all of `columns`, or without the draws' log-probs."""
        return self.columns if draw_logprobs else tuple(c for c in self.columns if c not in self.draw_logprob_columns)

    def describe(self, k: int, samples: int) -> str:
        """A few words for summaries: "top-64", "16 samples"."""
        raise NotImplementedError

    def raw_bytes(self, k: int, samples: int, id_bytes: int, target_vocab_size: int) -> int:
        """Bytes per position of its columns before compression (the dry run's estimate; for drawn
        kinds an upper bound: every draw a distinct id)."""
        raise NotImplementedError

    def fields(self, *, k: int, samples: int, target: pa.DataType) -> list[pa.Field]:
        """Its Arrow fields; target is the type of a target id."""
        raise NotImplementedError

    def encode(self, results: list, n_pos: list[int], field, k: int) -> dict[str, pa.Array]:
        """Its columns for the rows of `results` (sorted as written); field(name) is the schema's field.
        n_pos: each row's targets with soft targets (all of them, or a selected cache's soft_mask count;
        the results' soft parts then cover those targets only)."""
        raise NotImplementedError

    def read_check(self, table: pa.Table, manifest, n_pos: np.ndarray | None = None) -> str | None:
        """What every reader checks on a row group it decodes (only the columns it read): ids in
        range and whatever a loss would otherwise crash or train silently on. n_pos: targets per row
        with soft targets (a selected cache: the soft_mask counts)."""
        raise NotImplementedError

    def verify(self, table: pa.Table, manifest, n_pos: np.ndarray) -> str | None:
        """`kdcache verify`'s rules for its columns on a whole shard (beyond the schema and the
        one-entry-per-position check of `per_position`)."""
        raise NotImplementedError

    def decode(self, table: pa.Table, target_offsets: np.ndarray):
        """Its columns of `table` decoded once; target_offsets: each row's first target position."""
        raise NotImplementedError

    def batch(self, parts: dict) -> dict:
        raise NotImplementedError

    def weights(self, logprobs, counts, head: int, temperature: float):
        """(w, log_p) per stored id from a batch's target_logprobs (N, W) / target_counts / target_head:
        w sums to 1 per target (0 on padding); log_p is what the KL is measured against."""
        raise NotImplementedError

    def stats(self, table: pa.Table, k: int, totals: dict) -> np.ndarray | None:
        """`inspect` numbers of one row group, added to totals: head_mass (the exact head's probability
        mass), stored_mass (of every stored id), entries (stored ids). Returns the teacher's top-1 per
        position, or None where it is not stored."""
        raise NotImplementedError
