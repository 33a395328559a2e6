"""Reading and atomically writing a cache's manifest.json, and deciding whether a re-run matches."""
from __future__ import annotations

import errno
import json
import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KdcacheError
from .files import atomic_write_json
from .schema import FORMAT_VERSION, MANIFEST_NAME, READABLE_FORMAT_VERSIONS, TOKENIZER_DIR, targets_of
from .storage import ObjectPath, location

# Manifest keys that define *what* a cache holds. A re-run whose identity differs in any of
# them would mix two caches in one directory, so it is refused (unless --overwrite).
IDENTITY_KEYS = (
    "format_version", "task", "k", "vocab_size", "target_vocab_size", "dtype", "max_length",
    "packing", "mlm_probability", "mask_copies", "seed", "shard_rows", "teacher", "tokenizer", "data", "targets",
    "chat",  # chat caches: layout, --targets-on, template hash (absent = None for every other cache)
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
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (writes {FORMAT_VERSION}, or 3 with --select-positions or --no-draw-logprobs); "
            "re-dump with this kdcache or install the version that wrote it")
    return manifest


@dataclass(frozen=True)
class CacheManifest:
    """The typed view readers use instead of raw manifest keys (docs/FORMAT.md, "manifest.json"),
    with the defaults older caches imply. Built by `view` / `read_manifest_view`; `raw` is the dict."""
    task: str
    target_kind: str             # top-k, sample or top-k+sample
    k: int                       # top-k width (0 for `sample`)
    samples: int                 # draws per position (0 for `top-k`)
    vocab_size: int              # input id space
    target_vocab_size: int       # output size: vocab (LM) or labels (seq-cls)
    max_length: int
    special_token_ids: dict      # pad, bos, eos, cls, sep, mask -> id or None
    tokenizer_dir: str           # relative to the cache; resolve with resolve_inside
    teacher_config: str | None   # relative path of the teacher's config.json (None: made before it was stored)
    token_type_ids: bool
    num_labels: int | None
    id2label: dict = field(default_factory=dict)  # int -> label name (seq-cls)
    teacher: dict = field(default_factory=dict)   # the teacher's fingerprint (source, model_type, ...)
    draw_logprobs: bool = True   # drawn entries carry the teacher's log-prob (false: --no-draw-logprobs, v3)
    complete: bool = False
    num_shards: int | None = None
    shards: tuple = ()           # shard entries, ordered by index
    select_positions: float | None = None  # format v3: fraction of each row's targets with soft targets
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pad_id(self) -> int:
        pad = self.special_token_ids.get("pad")
        return 0 if pad is None else int(pad)


def view(manifest: dict | CacheManifest, where="the cache") -> CacheManifest:
    """The typed view of a manifest dict (a view is returned as it is); a missing required key is a
    one-line error."""
    if isinstance(manifest, CacheManifest):
        return manifest
    try:
        targets = targets_of(manifest)
        vocab_size = int(manifest["vocab_size"])
        return CacheManifest(
            task=manifest["task"], target_kind=targets["kind"], k=targets["k"], samples=targets["samples"],
            vocab_size=vocab_size, target_vocab_size=int(manifest.get("target_vocab_size") or vocab_size),
            max_length=int(manifest.get("max_length") or 0),
            special_token_ids=dict(manifest.get("special_token_ids") or {}),
            tokenizer_dir=(manifest.get("tokenizer") or {}).get("dir", TOKENIZER_DIR),
            teacher_config=manifest.get("teacher_config") or None,
            token_type_ids=bool(manifest.get("token_type_ids")),
            num_labels=int(manifest["num_labels"]) if manifest.get("num_labels") is not None else None,
            id2label={int(i): str(label) for i, label in (manifest.get("id2label") or {}).items()},
            teacher=dict(manifest.get("teacher") or {}),
            draw_logprobs=targets["draw_logprobs"],
            complete=bool(manifest.get("complete", False)),
            num_shards=manifest.get("num_shards"),
            shards=tuple(sorted(manifest.get("shards") or [], key=lambda s: s["index"])),
            select_positions=targets["select_positions"],
            raw=manifest,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise KdcacheError(f"{where}: manifest.json lacks or mangles {e}; re-create the cache with "
                           "`kdcache dump-logits`") from None


def read_manifest_view(cache_dir) -> CacheManifest:
    """read_manifest, as the typed view."""
    return view(read_manifest(cache_dir), f"cache {cache_dir}")


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


def content_identity(manifest: dict | CacheManifest) -> str:
    """A digest of what a cache holds, wherever it lies: its location-free identity (above) and every
    shard's file name, rows and sha256. The same cache copied to another disk or a bucket has the same
    one; a cache re-dumped with other settings or other data under the same path has another."""
    import hashlib

    raw = manifest.raw if isinstance(manifest, CacheManifest) else manifest
    shards = sorted((s.get("file"), s.get("rows"), s.get("sha256")) for s in raw.get("shards") or [])
    text = json.dumps({"identity": identity(raw), "shards": shards}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
