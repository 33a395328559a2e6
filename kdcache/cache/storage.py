"""Where a cache lives: a local directory, or a prefix in an object store behind pyarrow's filesystems.

`location("cache/")` is a pathlib.Path; `location("s3://bucket/prefix")` (or gs://, hdfs://: whatever
pyarrow.fs.FileSystem.from_uri supports) is an ObjectPath, which has the few pathlib methods the
cache reader uses, so the reading code is the same for both. Credentials, endpoint and region come
from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION), so any S3-compatible store (MinIO, Ceph, R2) works.

Shards are opened with `parquet_file` (random access: Parquet reads footers and single row groups, so
a stream fetches only the row groups it decodes) and small folders the Hugging Face loaders need
on disk (the tokenizer) are copied once per process by `local_dir`.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import KdcacheError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Files go to and from a bucket in pieces this big: a student of several GB never needs that much RAM.
CHUNK = 8 << 20


def _copy_stream(src, dst) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)


def is_remote(location) -> bool:
    """A URI with a scheme other than file:// (a str; pathlib would fold its '//' into '/')."""
    return isinstance(location, (str, ObjectPath)) and bool(_SCHEME.match(str(location))) \
        and not str(location).startswith("file://")


@dataclass(frozen=True)
class _StatResult:
    st_size: int


class ObjectPath:
    """A file or prefix in an object store: `/`, name, parent, exists/is_file/is_dir, stat().st_size,
    read_bytes/read_text, and str() giving the URI back for messages."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, scheme: str):
        self.filesystem, self.path, self.scheme = filesystem, path.strip("/"), scheme

    @classmethod
    def from_uri(cls, uri: str) -> ObjectPath:
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as e:  # an unknown scheme, or a store pyarrow was built without
            raise KdcacheError(f"cannot open {uri} ({str(e).splitlines()[0]}); use a local path or an "
                               "s3:// (gs://, hdfs://) URI that pyarrow supports") from None
        return cls(filesystem, path, uri.split("://", 1)[0])

    def __truediv__(self, part) -> ObjectPath:
        return ObjectPath(self.filesystem, posixpath.normpath(posixpath.join(self.path, str(part))), self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:  # sorted() of listings, as for pathlib
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.filesystem, posixpath.dirname(self.path), self.scheme)

    def _info(self) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.path)
        except OSError as e:
            raise KdcacheError(f"cannot reach {self} ({str(e).splitlines()[0]}); check the endpoint "
                               "(AWS_ENDPOINT_URL), the credentials and the bucket name") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _StatResult:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(str(self))
        return _StatResult(info.size)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open_input(self):
        """A random-access pyarrow file."""
        return self.filesystem.open_input_file(self.path)

    # Writing (dump-logits --out s3://...). An object appears only once its upload completes, so
    # a killed writer never leaves a half object under the final name (files.py relies on it).

    def iterdir(self):
        """The objects and sub-prefixes directly under this prefix."""
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise KdcacheError(f"cannot list {self} ({str(e).splitlines()[0]}); check the endpoint "
                               "(AWS_ENDPOINT_URL), the credentials and the bucket name") from None
        return [ObjectPath(self.filesystem, info.path, self.scheme) for info in infos]

    def glob(self, pattern: str):
        """Direct children whose name matches `pattern` (no '/' or '**' in patterns)."""
        return sorted(p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object lies under it."""

    def write_bytes(self, data: bytes) -> None:
        with self.filesystem.open_output_stream(self.path) as f:
            f.write(data)

    def upload_file(self, local: Path) -> None:
        """Stream a local file into this object (it appears whole, once the upload completes)."""
        with open(local, "rb") as src, self.filesystem.open_output_stream(self.path) as dst:
            _copy_stream(src, dst)

    def download_to(self, target: Path) -> Path:
        """Stream this object into a local file."""
        with self.filesystem.open_input_stream(self.path) as src, open(target, "wb") as dst:
            _copy_stream(src, dst)
        return target

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        """Delete every object under this prefix (nothing when there is none)."""
        try:
            self.filesystem.delete_dir(self.path)
        except FileNotFoundError:
            pass

    def upload_from(self, folder: Path) -> None:
        """Copy the local folder's files under this prefix."""
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            (self / file.relative_to(folder).as_posix()).upload_file(file)

    def copy_to(self, dest: Path) -> Path:
        """Copy this folder's objects into the local folder `dest`."""
        selector = pafs.FileSelector(self.path, recursive=True)
        for info in self.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File:
                target = dest / posixpath.relpath(info.path, self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                ObjectPath(self.filesystem, info.path, self.scheme).download_to(target)
        return dest


def location(where: str | Path | ObjectPath) -> Path | ObjectPath:
    """A cache location as given on the command line: a local Path, or an ObjectPath for a URI."""
    if isinstance(where, ObjectPath):
        return where
    if is_remote(where):
        return ObjectPath.from_uri(str(where))
    if isinstance(where, str) and where.startswith("file://"):
        return Path(where[len("file://"):])
    return Path(where)


_local_copies: dict[str, Path] = {}


def parquet_file(path: Path | ObjectPath, **options) -> pq.ParquetFile:
    """A Parquet file to read row groups from. From a bucket, each row group's column chunks are
    fetched in coalesced ranged reads (pre_buffer) instead of one request per column."""
    if isinstance(path, ObjectPath):
        return pq.ParquetFile(path.open_input(), pre_buffer=True, **options)
    return pq.ParquetFile(path, **options)


def open_stream(path: Path | ObjectPath):
    """A file to read from start to end (hashing), local or in a bucket."""
    return path.filesystem.open_input_stream(path.path) if isinstance(path, ObjectPath) else open(path, "rb")


def read_buffer(path: Path | ObjectPath):
    """A whole file as a pyarrow Buffer that Arrow owns. Handing Python `bytes` to a reader instead
    (pa.BufferReader(data)) lets one of Arrow's threads hold the last reference to a Python object
    after the read returned; dropping it needs the GIL, which aborts the process if that happens while
    the interpreter exits (apache/arrow#34314)."""
    import pyarrow as pa

    source = path.filesystem.open_input_stream(path.path) if isinstance(path, ObjectPath) else pa.OSFile(str(path))
    with source:
        return source.read_buffer()


def local_dir(path: Path | ObjectPath) -> Path:
    """A folder on local disk with the contents of `path` (copied once per process when remote,
    into a temporary folder)."""
    if not isinstance(path, ObjectPath):
        return path
    if str(path) not in _local_copies:
        _local_copies[str(path)] = path.copy_to(Path(tempfile.mkdtemp(prefix="kdcache-")) / (path.name or "root"))
    return _local_copies[str(path)]


def local_file(path: Path | ObjectPath) -> Path:
    """A file on local disk with the contents of `path` (copied once per process when remote)."""
    if not isinstance(path, ObjectPath):
        return path
    if str(path) not in _local_copies:
        copy = Path(tempfile.mkdtemp(prefix="kdcache-")) / path.name
        path.download_to(copy)
        _local_copies[str(path)] = copy
    return _local_copies[str(path)]


def describe(where) -> str:
    """How a location is recorded in run summaries: a URI as given, a local path made absolute."""
    return str(where) if is_remote(where) else str(Path(where).resolve())


def check_writable(out: Path | ObjectPath) -> None:
    """--out (a folder or bucket prefix) exists and takes a file, or one line saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kdcache-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
        raise KdcacheError(f"--out {out} is not writable ({reason}); choose a directory (or bucket prefix) you can "
                           "write to; for a bucket check the credentials and AWS_ENDPOINT_URL") from None
