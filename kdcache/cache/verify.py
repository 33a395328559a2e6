"""Checking a cache end to end: every shard's checksum, row count, schema, id ranges, log-probs,
and for sampled targets the draw counts (Σ counts = N per position, ids unique per position)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import KdcacheError
from . import schema as S
from .manifest import CacheManifest, read_manifest_view, resolve_inside, view
from .storage import location, read_buffer


def _flat(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    """Values of a (nested) list column as one numpy array."""
    arr = column.combine_chunks()
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def _check_logprobs(logprobs: np.ndarray, what: str) -> str | None:
    logprobs = logprobs.astype(np.float32)
    if not np.isfinite(logprobs).all():
        return f"non-finite {what} log-probs"
    if logprobs.size and logprobs.max() > 0:
        return f"{what} log-prob {logprobs.max()} > 0"
    return None


def check_samples(table: pa.Table, manifest: CacheManifest, topk_ids: np.ndarray | None,
                  n_pos: np.ndarray) -> str | None:
    """The sampled columns: each row's sample_lengths add up to its entries in all three, counts >= 1
    summing to N per position, distinct ids per position (and none of the top-k head's), ids in range, log-probs finite and <= 0."""
    # O(entries) throughout (cumulative sums, one sort of int64 keys): readers run this on every row group.
    entries = _flat(table.column(S.SAMPLE_LENGTHS), 1).astype(np.int64)  # per position
    ends = np.cumsum(entries)
    at_rows = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(n_pos)])]
    row_entries = np.diff(at_rows)
    for name in S.SAMPLE_ENTRY_COLUMNS:
        if not np.array_equal(pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False), row_entries):
            return f"{name} does not have sum(sample_lengths) entries in every row"
    ids = _flat(table.column(S.SAMPLE_IDS), 1)  # unsigned, as stored: widened only where needed
    counts = _flat(table.column(S.SAMPLE_COUNTS), 1)
    if ids.size and int(ids.max()) >= manifest.target_vocab_size:
        return f"sampled id {int(ids.max())} >= target_vocab_size {manifest.target_vocab_size}"
    if counts.size and int(counts.min()) < 1:
        return "a sampled id has draw count 0"
    counted = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    sums = counted[ends] - counted[ends - entries]
    # top-k+sample: a position whose teacher puts no (float64) probability outside the top-k has no tail to draw.
    ok = (sums == manifest.samples) | ((sums == 0) & (manifest.target_kind == S.TOP_K_SAMPLE))
    if len(entries) and not np.all(ok):
        bad = int(np.argmax(~ok))
        return f"draw counts sum to {int(sums[bad])} at a position, not samples = {manifest.samples}"
    # Distinct per position: ids are < target_vocab_size (checked above), so position * size + id is
    # one int64 key per (position, id) pair; a repeated pair is an equal neighbour once sorted.
    position = np.repeat(np.arange(len(entries)), entries)
    keys = np.sort(position * manifest.target_vocab_size + ids.astype(np.int64))
    if np.any(keys[1:] == keys[:-1]):
        return "an id appears twice among one position's sampled ids"
    if topk_ids is not None and ids.size and (topk_ids[position] == ids[:, None]).any():
        return "a sampled id repeats one of its position's top-k ids (the tail excludes the head)"
    return _check_logprobs(_flat(table.column(S.SAMPLE_LOGPROBS), 1), "sampled")


def check_rows(table: pa.Table, manifest: CacheManifest) -> str | None:
    """What a reader checks on every row group it decodes, for the columns it read: ids within the
    vocabulary, and for sampled targets the rules of check_samples (counts sum to N, ids distinct per
    position). A checksum proves a shard is what was written, not that what was written is sane: an
    id >= vocab would otherwise crash the loss with an index error, and a bad count train silently.
    Vectorised over the whole row group: see BENCHMARKS.md for its share of the loader's time."""
    names = table.column_names
    if S.INPUT_IDS in names:
        input_ids = _flat(table.column(S.INPUT_IDS), 1)
        if input_ids.size and int(input_ids.max()) >= manifest.vocab_size:
            return f"input id {int(input_ids.max())} >= vocab_size {manifest.vocab_size}"
    topk_ids = None
    if S.TOPK_IDS in names:
        topk_ids = _flat(table.column(S.TOPK_IDS), 2)
        if topk_ids.size and int(topk_ids.max()) >= manifest.target_vocab_size:
            return f"top-k id {int(topk_ids.max())} >= target_vocab_size {manifest.target_vocab_size}"
        topk_ids = topk_ids.reshape(-1, manifest.k)
    if S.SAMPLE_IDS in names:
        # From the offsets: pc.list_value_length on this column measured 6 ms per 32k-position row group.
        n_pos = np.diff(table.column(S.POSITIONS).combine_chunks().offsets.to_numpy())
        return check_samples(table, manifest, topk_ids, n_pos)
    return None


def schema_difference(actual: pa.Schema, expected: pa.Schema) -> str:
    """The first column where a shard's schema departs from the one its manifest implies, in a few
    words (printing both schemas would take dozens of lines)."""
    for i, want in enumerate(expected):
        if want.name not in actual.names:
            return f"schema lacks column {want.name} ({want.type}) that the manifest implies"
        have = actual.field(want.name)
        if not have.type.equals(want.type):
            return f"schema: column {want.name} is {have.type}, the manifest implies {want.type}"
        if have.nullable != want.nullable:
            return f"schema: column {want.name} is {'' if have.nullable else 'not '}nullable, unlike the manifest's"
        if actual.get_field_index(want.name) != i:
            return f"schema: column {want.name} is column {actual.get_field_index(want.name)}, the manifest's order has it at {i}"
    extra = [name for name in actual.names if name not in expected.names]
    if extra:
        return f"schema has column {extra[0]} that the manifest does not imply"
    return "schema differs from the manifest's in its field metadata"


def check_shard(cache_dir: Path, manifest: CacheManifest | dict, entry: dict) -> str | None:
    """Why this shard is bad, in a few words; None when it is fine."""
    manifest = view(manifest)
    path = location(cache_dir) / entry["file"]  # confined by verify_cache before
    if not path.is_file():
        return "file is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} bytes, manifest says {entry['bytes']}"
    data = read_buffer(path)  # read once (one download from a bucket): hashed, then parsed
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "sha256 does not match the manifest (corrupted or modified)"
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad shard
        return f"unreadable Parquet ({type(e).__name__})"
    expected = S.schema_for_manifest(manifest.raw)
    if not table.schema.remove_metadata().equals(expected.remove_metadata()):
        return schema_difference(table.schema.remove_metadata(), expected.remove_metadata())
    if table.num_rows != entry["rows"]:
        return f"{table.num_rows} rows, manifest says {entry['rows']}"
    n_pos = pc.list_value_length(table.column(S.POSITIONS)).to_numpy(zero_copy_only=False)
    if int(n_pos.sum()) != entry["positions"]:
        return f"{int(n_pos.sum())} positions, manifest says {entry['positions']}"
    kind = manifest.target_kind
    per_position = [c for c in S.soft_target_columns(kind) if c not in S.SAMPLE_ENTRY_COLUMNS]
    for col in per_position + [S.LABELS]:
        if not np.array_equal(pc.list_value_length(table.column(col)).to_numpy(zero_copy_only=False), n_pos):
            return f"{col} does not have one entry per position"
    input_ids = _flat(table.column(S.INPUT_IDS), 1)
    if input_ids.size and int(input_ids.max()) >= manifest.vocab_size:
        return f"input id {int(input_ids.max())} >= vocab_size {manifest.vocab_size}"
    topk_ids = None
    if S.has_topk(kind):
        topk_ids = _flat(table.column(S.TOPK_IDS), 2)
        if topk_ids.size and int(topk_ids.max()) >= manifest.target_vocab_size:
            return f"top-k id {int(topk_ids.max())} >= target_vocab_size {manifest.target_vocab_size}"
        logprobs = _flat(table.column(S.TOPK_LOGPROBS), 2)
        problem = _check_logprobs(logprobs, "top-k")
        if problem:
            return problem
        k = manifest.k
        if logprobs.size and (np.diff(logprobs.reshape(-1, k).astype(np.float32), axis=1) > 0).any():
            return "top-k log-probs are not sorted in descending order"
        topk_ids = topk_ids.reshape(-1, k)
    if S.has_samples(kind):
        problem = check_samples(table, manifest, topk_ids, n_pos)
        if problem:
            return problem
    seq_len = pc.list_value_length(table.column(S.INPUT_IDS)).to_numpy(zero_copy_only=False)
    positions = _flat(table.column(S.POSITIONS), 1)
    if positions.size and (positions >= np.repeat(seq_len, n_pos)).any():
        return "a position is beyond its row's input_ids"
    return None


def verify_cache(cache_dir: Path, progress=None) -> dict:
    """Raise KdcacheError naming the first bad shard; return a small report when all is well."""
    cache_dir = location(cache_dir)  # a local folder or a bucket prefix
    manifest = read_manifest_view(cache_dir)
    shards = manifest.shards
    if len(shards) != manifest.num_shards:
        raise KdcacheError(f"{cache_dir} is incomplete ({len(shards)} of {manifest.num_shards} shards); "
                           "re-run the same `kdcache dump-logits` command to finish it")
    for i, entry in enumerate(shards):
        resolve_inside(cache_dir, entry.get("file"), f"shards[{i}].file")
    resolve_inside(cache_dir, manifest.tokenizer_dir, "tokenizer.dir")
    for entry in shards:
        problem = check_shard(cache_dir, manifest, entry)
        if problem:
            raise KdcacheError(f"shard {entry['file']} of {cache_dir} is bad: {problem}; "
                               f"delete it and its sidecar and re-run `kdcache dump-logits` to rewrite it")
        if progress is not None:
            progress(entry)
    if not manifest.complete:
        raise KdcacheError(f"{cache_dir}: manifest says complete=false; re-run `kdcache dump-logits` to finish it")
    return {"shards": len(shards), "rows": sum(s["rows"] for s in shards), "positions": sum(s["positions"] for s in shards)}
