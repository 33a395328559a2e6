"""Reading and atomically writing a cache's manifest.json, and deciding whether a re-run matches."""
from __future__ import annotations

import errno
import json
import os
import posixpath
from contextlib import contextmanager
from pathlib import Path

from ..errors import KdcacheError
from .files import atomic_write_bytes, atomic_write_json  # noqa: F401 - re-exported for older imports
from .schema import FORMAT_VERSION, MANIFEST_NAME, READABLE_FORMAT_VERSIONS
from .storage import ObjectPath, location

# Manifest keys that define *what* a cache holds. A re-run whose identity differs in any of
# them would mix two caches in one directory, so it is refused (unless --overwrite).
IDENTITY_KEYS = (
    "format_version", "task", "k", "vocab_size", "target_vocab_size", "dtype", "max_length",
    "packing", "mlm_probability", "mask_copies", "seed", "shard_rows", "teacher", "tokenizer", "data", "targets",
)


def resolve_inside(cache_dir: Path, relpath, what: str) -> Path:
    """`cache_dir / relpath`, refusing any manifest path that could leave the cache.

    The one place the rule lives (docs/FORMAT.md, "Paths"): a manifest path is relative, uses
    '/', and stays inside the cache after normalising '.' and '..'. Checked on the text, not
    by resolving symlinks: a cache may itself be a link, or keep data/ on another disk.
    """
    if not isinstance(relpath, str) or not relpath.strip():
        raise KdcacheError(f"cache {cache_dir}: manifest {what} is {relpath!r}, not a relative path; "
                           "the manifest is damaged: re-create the cache with `kdcache dump-logits`")
    normal = posixpath.normpath(relpath.replace("\\", "/"))
    if posixpath.isabs(normal) or os.path.isabs(relpath) or normal == ".." or normal.startswith("../"):
        raise KdcacheError(f"cache {cache_dir}: manifest {what} {relpath!r} points outside the cache; every path in "
                           "manifest.json must be relative and inside the cache: refusing it (re-create the cache "
                           "with `kdcache dump-logits`, or fix the manifest)")
    return location(cache_dir) / normal  # a local Path, or an ObjectPath in a bucket


# Errors of a full disk (or quota): the dump can resume once space is freed.
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextmanager
def writing(what: str, path: Path):
    """Turn an OSError while writing a cache file into a one-line error saying what to do."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]  # pyarrow's have no strerror
        if e.errno in DISK_FULL:
            raise KdcacheError(f"{reason} while writing {what} {path}; free space on that disk and re-run the same "
                               "`kdcache dump-logits` command: completed shards are kept and it resumes") from None
        raise KdcacheError(f"cannot write {what} {path} ({reason}); fix the cause and re-run the same "
                           "`kdcache dump-logits` command: completed shards are kept and it resumes") from None


def write_cache_json(path: Path, obj: dict, what: str = "the manifest") -> None:
    """atomic_write_json for a cache's own files: a full disk is a one-line error."""
    with writing(what, path):
        atomic_write_json(path, obj)


def manifest_path(cache_dir: Path) -> Path:
    return location(cache_dir) / MANIFEST_NAME


def enclosing_cache(path: Path) -> Path | None:
    """The kdcache cache that `path` is (or lies inside), if any; `path` need not exist."""
    path = location(path)
    if isinstance(path, ObjectPath):
        folders = [path]
        while "/" in folders[-1].path:  # up to the bucket itself
            folders.append(folders[-1].parent)
    else:
        path = Path(os.path.abspath(path))  # '..' collapsed, so parents are the real ones
        folders = [path, *path.parents]
    for folder in folders:
        try:
            manifest = json.loads(manifest_path(folder).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and "format_version" in manifest and "shards" in manifest:
            return folder
    return None


def read_manifest(cache_dir: Path) -> dict:
    """Load and sanity-check a cache's manifest, with one-line errors for the usual mistakes."""
    cache_dir = location(cache_dir)  # a local folder or an object-store prefix (cache/storage.py)
    path = manifest_path(cache_dir)
    if not cache_dir.exists():
        raise KdcacheError(f"cache directory {cache_dir} does not exist; create it with `kdcache dump-logits`")
    if not path.is_file():
        raise KdcacheError(f"{cache_dir} is not a kdcache cache (no {MANIFEST_NAME}); point at the --out of `kdcache dump-logits`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KdcacheError(f"{path} is unreadable or not JSON ({e}); re-create the cache with `kdcache dump-logits --overwrite`") from None
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise KdcacheError(
            f"{path} has cache format version {version!r}, this kdcache reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (writes {FORMAT_VERSION}); "
            "re-dump with this kdcache or install the version that wrote it")
    return manifest


# Where the teacher or corpus lives is not what it is: a moved teacher folder or corpus file with
# the same checksums still resumes. (Paths are compared only when no checksum exists.)
LOCATION_KEYS = {"teacher": ("source", "gguf_file"), "data": ("source",)}
CHECKSUM_KEYS = {"teacher": "weights_sha256", "data": "content_sha256"}


def identity(manifest: dict) -> dict:
    out = {}
    for key in IDENTITY_KEYS:
        value = manifest.get(key)
        if key in LOCATION_KEYS and isinstance(value, dict) and value.get(CHECKSUM_KEYS[key]):
            value = {sub: v for sub, v in value.items() if sub not in LOCATION_KEYS[key]}
        out[key] = value
    return out


def identity_differences(old: dict, new: dict) -> list[str]:
    """Names of identity keys (dotted for nested dicts) whose values differ."""
    old, new = identity(old), identity(new)
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            diffs.append(key)
    return diffs
