"""Checking a cache end to end: every shard's checksum, row count, schema, id ranges, and the rules
of its target kind (kdcache/cache/kinds/: log-probs, for sampled targets Σ counts = N per position
and ids unique per position)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import KdcacheError
from . import schema as S
from .kinds import kind_of
from .kinds.base import flat as _flat
from .manifest import CacheManifest, read_manifest_view, resolve_inside, view
from .storage import location, read_buffer


def check_rows(table: pa.Table, manifest: CacheManifest) -> str | None:
    """What a reader checks on every row group it decodes, for the columns it read: ids within the
    vocabulary, and the target kind's `read_check` (e.g. for sampled targets: counts sum to N, ids
    distinct per position). A checksum proves a shard is what was written, not that what was written is sane: an
    id >= vocab would otherwise crash the loss with an index error, and a bad count train silently.
    Vectorised over the whole row group: see BENCHMARKS.md for its share of the loader's time."""
    names = table.column_names
    if S.INPUT_IDS in names:
        input_ids = _flat(table.column(S.INPUT_IDS), 1)
        if input_ids.size and int(input_ids.max()) >= manifest.vocab_size:
            return f"input id {int(input_ids.max())} >= vocab_size {manifest.vocab_size}"
    kind = kind_of(manifest.target_kind)
    if any(name in names for name in kind.columns):
        # From the offsets: pc.list_value_length on this column measured 6 ms per 32k-position row group.
        n_pos = np.diff(table.column(S.POSITIONS).combine_chunks().offsets.to_numpy())
        if manifest.select_positions is not None:  # the kind's entries: selected targets only
            problem, n_pos = soft_targets_per_row(table, manifest, kind, n_pos)
            if problem:
                return problem
        return kind.read_check(table, manifest, n_pos)
    return None


def soft_targets_per_row(table: pa.Table, manifest: CacheManifest, kind, n_pos: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(problem, targets with soft targets per row): all of n_pos, or a selected cache's soft_mask counts
    (check_soft_mask); and each of the kind's per-position columns present must have exactly that many
    entries per row, else decoding would pair soft targets with the wrong positions. From the offsets."""
    n_soft = n_pos
    if manifest.select_positions is not None:
        problem, n_soft = check_soft_mask(table, manifest, n_pos)
        if problem:
            return problem, n_soft
    for name in kind.per_position:
        if name in table.column_names and not np.array_equal(
                np.diff(table.column(name).combine_chunks().offsets.to_numpy()), n_soft):
            return (f"{name} does not have one entry per position" if manifest.select_positions is None
                    else f"{name} does not have one entry per selected position (soft_mask)"), n_soft
    return None, n_soft


def check_soft_mask(table: pa.Table, manifest: CacheManifest, n_pos: np.ndarray) -> tuple[str | None, np.ndarray]:
    """A selected cache's soft_mask (format v3): one bool per target in every row, and per row as many
    True as the rounding rule keeps (schema.selected_counts). Returns (problem, selected targets per row),
    the counts the kind's columns must have entries for. Vectorised: offsets and one cumulative sum."""
    if S.SOFT_MASK not in table.column_names:
        return f"column {S.SOFT_MASK} is missing from a cache made with --select-positions", n_pos
    column = table.column(S.SOFT_MASK).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    if not np.array_equal(np.diff(offsets), n_pos):
        return f"{S.SOFT_MASK} does not have one entry per position", n_pos
    mask = column.values.to_numpy(zero_copy_only=False)  # not slice-aware: the offsets index into all of it
    counted = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    n_soft = counted[offsets[1:]] - counted[offsets[:-1]]
    want = S.selected_counts(manifest.select_positions, n_pos)
    if not np.array_equal(n_soft, want):
        bad = int(np.argmax(n_soft != want))
        return (f"a row selects {int(n_soft[bad])} of its {int(n_pos[bad])} positions, --select-positions "
                f"{manifest.select_positions} keeps {int(want[bad])}"), n_pos
    return None, n_soft


def schema_difference(actual: pa.Schema, expected: pa.Schema) -> str:
    """The first column where a shard's schema departs from the one its manifest implies, in a few
    words (printing both schemas would take dozens of lines)."""
    # An extra column first: it would otherwise show as the next column's position being off.
    extra = [name for name in actual.names if name not in expected.names]
    if extra:
        return f"schema has column {extra[0]} that the manifest does not imply"
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
    kind = kind_of(manifest.target_kind)
    if not np.array_equal(pc.list_value_length(table.column(S.LABELS)).to_numpy(zero_copy_only=False), n_pos):
        return f"{S.LABELS} does not have one entry per position"
    problem, n_soft = soft_targets_per_row(table, manifest, kind, n_pos)  # all targets, unless the cache selects
    if problem:
        return problem
    input_ids = _flat(table.column(S.INPUT_IDS), 1)
    if input_ids.size and int(input_ids.max()) >= manifest.vocab_size:
        return f"input id {int(input_ids.max())} >= vocab_size {manifest.vocab_size}"
    problem = kind.verify(table, manifest, n_soft)
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
    version, needed = manifest.raw.get("format_version"), S.format_version_for(manifest.raw.get("targets") or {})
    # A v3 feature under an older version: a reader of that version would misread the cache. (Versions 1
    # and 2 differ only in what kdcache wrote: v1 has no targets, read as top-k.)
    if needed > S.FORMAT_VERSION and isinstance(version, int) and version < needed:
        raise KdcacheError(f"{cache_dir}: manifest says format_version {version}, but its targets "
                           f"({S.describe_targets(manifest.raw)}) are a version-{needed} feature; the manifest is "
                           "damaged: re-create the cache with `kdcache dump-logits`")
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
