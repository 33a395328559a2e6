"""Writing shards atomically (with their stats sidecars) and finding the complete ones."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import KdcacheError
from .files import atomic_write_json, remove_temp_files, write_parquet
from .manifest import resolve_inside, writing
from .storage import ObjectPath, location, parquet_file
from .schema import (
    DEFAULT_ROW_GROUP_ROWS, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, POSITIONS,
    SHARD_DIR, SHARD_PATTERN, column_encodings, shard_name, shard_stats_name,
)

# Errors pyarrow raises for a damaged page: a failed page CRC, a zstd or thrift decode error,
# a length that no longer adds up. All mean the same thing to a user.
READ_ERRORS = (OSError, pa.ArrowException, ValueError)


def write_shard(cache_dir: Path | ObjectPath, index: int, table: pa.Table,
                row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Write shard `index` atomically and return its stats (also saved as the sidecar JSON).

    Order matters for crash safety: the Parquet file first (locally: temp name, fsync, rename;
    in a bucket: one whole-object upload), then the sidecar (atomic too). A shard counts as
    complete only once its sidecar exists, so a store without rename needs nothing more.
    """
    cache_dir = location(cache_dir)
    final = cache_dir / shard_name(index)
    final.parent.mkdir(parents=True, exist_ok=True)
    with writing("shard", final):
        # Page CRCs: every reader verifies each page it decodes, so a flipped bit is an
        # error naming the shard instead of a silently changed soft target.
        size, sha256 = write_parquet(
            table, final, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
            row_group_size=row_group_rows, use_dictionary=False, write_statistics=False,
            write_page_checksum=True, column_encoding=column_encodings(table.schema),
        )
    positions = int(pa.compute.sum(pa.compute.list_value_length(table.column(POSITIONS))).as_py() or 0)
    stats = {
        "index": index,
        "file": shard_name(index),
        "rows": table.num_rows,
        "positions": positions,
        "bytes": size,
        "sha256": sha256,
    }
    with writing("shard sidecar", cache_dir / shard_stats_name(index)):
        atomic_write_json(cache_dir / shard_stats_name(index), stats)
    return stats


def open_shard(path: Path) -> pq.ParquetFile:
    """A shard for reading, with every page's CRC checked as it is decoded (shards written
    before kdcache stored page CRCs have none, and read as before)."""
    return parquet_file(path, page_checksum_verification=True)  # local, or ranged reads from a bucket


def corrupt_shard_error(cache_dir: Path, entry: dict, cause: BaseException | str) -> KdcacheError:
    """The one message for a shard whose bytes no longer decode: which shard, and the fix."""
    cause = cause if isinstance(cause, str) else (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    sidecar = shard_stats_name(entry["index"]) if "index" in entry else "its stats sidecar"
    return KdcacheError(
        f"shard {entry['file']} of cache {cache_dir} is corrupt ({cause}); re-dump it: delete {entry['file']} and "
        f"{sidecar}, then re-run the same `kdcache dump-logits` command (its resume regenerates exactly that shard)")


def read_shard_stats(cache_dir: Path, index: int) -> dict | None:
    """Stats of shard `index` if it is complete (sidecar present and file size matches), else None."""
    cache_dir = location(cache_dir)
    sidecar = cache_dir / shard_stats_name(index)
    try:
        stats = json.loads(sidecar.read_text())
        if resolve_inside(cache_dir, stats["file"], f"{sidecar.name} file").stat().st_size != stats["bytes"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, KdcacheError):
        return None
    return stats


def complete_shards(cache_dir: Path, known: dict[int, dict] | None = None) -> dict[int, dict]:
    """All complete shards in the directory (or bucket prefix), by index. `known`: shards already
    found complete in this run, not read again (a sidecar never changes once written; in a bucket
    each read is a request)."""
    cache_dir = location(cache_dir)
    out = {}
    prefix, suffix = SHARD_PATTERN.split("{")[0], ".parquet"
    for path in (cache_dir / SHARD_DIR).glob(f"{prefix}*{suffix}"):  # by index below; sorting paths costs more
        try:
            index = int(path.name[len(prefix):-len(suffix)])
        except ValueError:
            continue
        stats = known[index] if known and index in known else read_shard_stats(cache_dir, index)
        if stats is not None:
            out[index] = stats
    return out


def remove_partial_files(cache_dir: Path | ObjectPath) -> None:
    """Delete temp files a killed writer left behind (they never become shards)."""
    cache_dir = location(cache_dir)
    remove_temp_files(cache_dir)
    remove_temp_files(cache_dir / SHARD_DIR)
