"""What happens to --out: refuse a foreign or different cache, clear one on --overwrite, and lay
out a new cache's manifest, tokenizer and teacher config (a local folder or a bucket prefix)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..cache import schema as S
from ..cache.files import atomic_write_bytes, remove_tree
from ..cache.manifest import (
    enclosing_cache, identity_differences, manifest_path, read_manifest, write_cache_json, writing,
)
from ..cache.shards import remove_partial_files
from ..cache.storage import ObjectPath, check_writable, location
from ..errors import KdcacheError
from .record import with_shards
from .teacher import config_json


def check_output_dir(out: Path, new_identity: dict, overwrite: bool) -> bool:
    """Decide what happens to --out; returns True when an existing cache must be cleared first.

    Only reads: nothing is deleted here (the caller clears after all inputs are validated).
    """
    if out.exists() and not out.is_dir():
        raise KdcacheError(f"--out {out} is a file, not a directory; choose a new directory for the cache")
    outer = enclosing_cache(out.parent)
    if outer is not None:
        raise KdcacheError(f"--out {out} is inside the cache {outer}: its files would mix with that cache's (and "
                           "`pandas.read_parquet(CACHE/data)` would break); choose an --out outside it")
    if not out.exists():
        return False
    if manifest_path(out).is_file():
        try:
            old = read_manifest(out)
        except KdcacheError:
            if overwrite:
                return True
            raise
        diffs = identity_differences(old, new_identity)
        if diffs and not overwrite:
            raise KdcacheError(f"--out {out} holds a different cache (differs in: {', '.join(diffs)}); "
                               "use another --out, or pass --overwrite to replace it")
        return overwrite
    if any(out.iterdir()):
        raise KdcacheError(f"--out {out} exists, is not empty and is not a kdcache cache; refusing to write into it; "
                           "choose a new or empty directory")
    return False


def clear_cache(out: Path) -> None:
    """Remove only what a cache consists of, never other files a user may keep there."""
    manifest_path(out).unlink(missing_ok=True)
    for sub in (S.SHARD_DIR, S.TOKENIZER_DIR, Path(S.TEACHER_CONFIG).parent.as_posix()):
        remove_tree(out / sub)


def save_tokenizer(tokenizer, dest: Path | ObjectPath) -> None:
    """save_pretrained into the cache; into a bucket through a local temporary folder."""
    if not isinstance(dest, ObjectPath):
        tokenizer.save_pretrained(dest)
        return
    with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        dest.upload_from(Path(folder))


def resolve_out(out) -> Path | ObjectPath:
    """--out as a location: a bucket prefix as given, a local folder made absolute."""
    where = location(out)
    return where if isinstance(where, ObjectPath) else where.expanduser().absolute()


def prepare_output(out: Path | ObjectPath, manifest: dict, teacher, overwrite: bool, known: dict | None = None) -> dict:
    """Check --out, clear it if asked, and write the new cache's first files (rank 0 only).
    Returns the `dump` record of earlier sessions of this same cache (empty when new); `known`
    receives the complete shards found (the resume's one listing of data/)."""
    previous_run = {}
    clear = check_output_dir(out, manifest, overwrite)
    if not clear and manifest_path(out).is_file():
        previous_run = read_manifest(out).get("dump") or {}  # earlier sessions of this same cache
    check_writable(out)
    if clear:
        clear_cache(out)
    remove_partial_files(out)
    # Manifest first: a run killed right after still leaves a directory recognised as this cache.
    write_cache_json(manifest_path(out), with_shards(manifest, out, known))
    with writing("the tokenizer", out / S.TOKENIZER_DIR):
        save_tokenizer(teacher.tokenizer, out / S.TOKENIZER_DIR)
    with writing("the teacher config", out / S.TEACHER_CONFIG):
        (out / S.TEACHER_CONFIG).parent.mkdir(exist_ok=True)
        atomic_write_bytes(out / S.TEACHER_CONFIG, config_json(teacher))
    return previous_run
