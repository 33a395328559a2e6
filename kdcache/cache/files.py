"""Writing files so that readers never see half of one, and hashing them: the one place for both.

Local files: write a temporary sibling, fsync, rename (readers see the old file or the new one).
Object stores have no rename, but an object becomes visible only once its upload completes, so a
whole-object PUT is the atomic write there (a killed upload leaves no object under the final name).
What makes a multi-file unit (a shard and its sidecar) complete is decided by the caller's order
of writes: see docs/FORMAT.md, "Writing to a store without rename".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import ObjectPath, open_stream

CHUNK = 1 << 22


def temp_name(path: Path) -> Path:
    """The temporary sibling a local atomic write goes through (`.NAME.tmp-PID`: never a shard name)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to the disk (before a rename makes it the real one)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _replacing(path: Path):
    """The temporary sibling to write `path` through; fsynced and renamed over `path` when the block ends."""
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a half-written file is never used; on a full disk its space is wanted back
        raise


def atomic_write_bytes(path: Path | ObjectPath, data: bytes) -> None:
    """Readers see the old file or the new one, never a part."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)  # one PUT: visible only once complete
        return
    with _replacing(Path(path)) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: Path | ObjectPath, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def write_parquet(table: pa.Table, path: Path | ObjectPath, **options) -> tuple[int, str]:
    """Write `table` to `path` atomically; returns (bytes, sha256) of what was written.

    Locally through a temporary sibling, fsync and rename. To a bucket the file is encoded in
    memory (it is smaller than the table already held there), hashed, then uploaded whole.
    """
    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        data = sink.getvalue()
        path.write_bytes(data)
        return data.size, hashlib.sha256(data).hexdigest()
    with _replacing(path) as tmp:
        pq.write_table(table, tmp, **options)
    return path.stat().st_size, file_sha256(path)


def remove_tree(path: Path | ObjectPath) -> None:
    """Delete a folder (or every object under a prefix) if it exists."""
    if isinstance(path, ObjectPath):
        path.remove_tree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_temp_files(folder: Path | ObjectPath) -> None:
    """Delete temporaries a killed local writer left in `folder` (a bucket never has any)."""
    if not isinstance(folder, ObjectPath):
        for tmp in Path(folder).glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def file_sha256(path: Path | ObjectPath) -> str:
    """sha256 of a file's bytes, local or in a bucket."""
    h = hashlib.sha256()
    with open_stream(path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def files_sha256(files) -> str:
    """One sha256 over several files: the name-tagged sha256 of each, in the order given."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def json_sha256(obj) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
