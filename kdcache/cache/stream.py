"""Streaming a cache into training: a torch IterableDataset over its Parquet shards.

Design (after mosaicml/streaming, applied to soft targets):
- The unit of I/O is a Parquet row group; memory holds a few row groups plus one shuffle
  window of rows, whatever the cache size.
- Epoch e orders the row groups by a permutation drawn from (seed, e). That order defines a
  virtual sequence of all rows, split into world_size * num_workers contiguous, equal-sized
  blocks (±1 row): block r * num_workers + w belongs to worker w of rank r. So every row is read
  by exactly one of them per epoch and every rank gets the same number of rows (±num_workers).
- Each block is cut into windows of `shuffle_buffer` rows; the rows of a window are emitted in
  a permutation drawn from (seed, e, block, window): the second level of the shuffle.
- A worker emits batches of `batch_size` consecutive rows of its sequence (the last may be
  short). DataLoader returns worker batches round-robin, so a rank's batch order is fixed.
- The position is (seed, epoch, samples consumed by this rank): from it each worker computes how
  many of its rows were already consumed and skips them without decoding, continuing at
  exactly the next sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import KdcacheError
from .collate import DecodedRows, collate
from .manifest import read_manifest, resolve_inside
from .schema import (
    EXAMPLE_ID, INPUT_IDS, LABELS, POSITIONS, TOKEN_TYPE_IDS, schema_for_manifest, soft_target_columns, targets_of,
)
from .shards import READ_ERRORS, corrupt_shard_error, open_shard

DEFAULT_SHUFFLE_BUFFER = 2048
# Shard files a stream keeps open at once: re-opening one costs only a footer read.
OPEN_SHARDS = 1


@dataclass(frozen=True)
class RowGroup:
    shard: int   # position in OpenCache.shard_paths
    group: int   # row group within that shard
    rows: int


@dataclass
class OpenCache:
    """A cache whose manifest and shard list were checked: every listed shard is there, with
    the size the manifest records, a readable Parquet footer, the row count and the schema."""
    dir: Path
    manifest: dict
    shard_paths: list[Path]
    row_groups: list[RowGroup]

    @property
    def num_rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def pad_id(self) -> int:
        pad = (self.manifest.get("special_token_ids") or {}).get("pad")
        return 0 if pad is None else int(pad)

    @property
    def tokenizer_dir(self) -> Path:
        return resolve_inside(self.dir, (self.manifest.get("tokenizer") or {}).get("dir", "tokenizer"), "tokenizer.dir")

    @property
    def has_token_type_ids(self) -> bool:
        return bool(self.manifest.get("token_type_ids"))


def open_cache(cache_dir: str | Path) -> OpenCache:
    """Check a cache before training on it; every problem is a one-line KdcacheError."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    shards = sorted(manifest.get("shards") or [], key=lambda s: s["index"])
    if not manifest.get("complete", False):
        raise KdcacheError(
            f"cache {cache_dir} is incomplete ({len(shards)} of {manifest.get('num_shards', '?')} shards written); "
            "finish it by re-running the same `kdcache dump-logits` command")
    if not shards:
        raise KdcacheError(f"cache {cache_dir} lists no shards; re-create it with `kdcache dump-logits`")
    expected = schema_for_manifest(manifest)
    paths, groups = [], []
    resolve_inside(cache_dir, (manifest.get("tokenizer") or {}).get("dir", "tokenizer"), "tokenizer.dir")
    for i, shard in enumerate(shards):
        path = resolve_inside(cache_dir, shard.get("file"), f"shards[{i}].file")
        fix = f"re-run the dump-logits command that made it (it rewrites missing shards) or `kdcache verify {cache_dir}`"
        if not path.is_file():
            raise KdcacheError(f"shard {shard['file']} of cache {cache_dir} is missing; {fix}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise KdcacheError(f"shard {shard['file']} of cache {cache_dir} is corrupt: {size} bytes on disk, "
                               f"the manifest says {shard['bytes']}; {fix}")
        try:
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as e:  # pyarrow raises several types for a damaged file
            # Its sidecar still says "complete", so only deleting both makes the dump rewrite it.
            raise corrupt_shard_error(cache_dir, shard, f"unreadable Parquet: {str(e).splitlines()[0]}") from None
        if meta.num_rows != shard["rows"]:
            raise corrupt_shard_error(cache_dir, shard, f"{meta.num_rows} rows, the manifest says {shard['rows']}")
        for name in expected.names:  # the target kind's columns, token_type_ids where cached
            if name not in schema.names or schema.field(name).type != expected.field(name).type:
                found = schema.field(name).type if name in schema.names else "missing"
                raise KdcacheError(f"shard {shard['file']} of cache {cache_dir} has column {name!r} of type "
                                   f"{found}, expected {expected.field(name).type}; {fix}")
        paths.append(path)
        groups += [RowGroup(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                   if meta.row_group(g).num_rows > 0]
    return OpenCache(cache_dir, manifest, paths, groups)


def block_bounds(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, end) of block `part` when `total` items are split into `parts` contiguous blocks."""
    return total * part // parts, total * (part + 1) // parts


def round_robin(batch_counts: list[int]):
    """(worker, batch index) in the order DataLoader hands out worker batches: round-robin,
    skipping workers that are exhausted."""
    for t in range(max(batch_counts, default=0)):
        for w, count in enumerate(batch_counts):
            if t < count:
                yield w, t


class CacheStream(IterableDataset):
    """Batches of sparse targets from a cache, for one rank; see the module docstring.

    Use it through StreamLoader (which tracks the position), or in a DataLoader with
    batch_size=None and num_workers equal to the `num_workers` given here.
    """

    def __init__(self, cache: OpenCache | str | Path, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, soft_targets: bool = True):
        self.cache = cache if isinstance(cache, OpenCache) else open_cache(cache)
        if batch_size < 1:
            raise KdcacheError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.soft_targets = soft_targets
        self.epoch, self.start_sample = 0, 0
        self._files: dict[int, pq.ParquetFile] = {}
        self._last_group: tuple[int, pa.Table] | None = None

    # -- position ---------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def set_position(self, epoch: int, samples_consumed: int = 0) -> None:
        """Where the next iteration starts: `samples_consumed` rows into epoch `epoch` (this rank)."""
        self.epoch, self.start_sample = int(epoch), int(samples_consumed)

    def worker_rows(self, rank: int | None = None) -> list[int]:
        """Rows each worker of `rank` reads per epoch (the same every epoch)."""
        rank = self.rank if rank is None else rank
        parts = self.world_size * self.workers
        sizes = []
        for w in range(self.workers):
            start, end = block_bounds(self.cache.num_rows, parts, rank * self.workers + w)
            sizes.append(end - start)
        return sizes

    def batches_per_epoch(self, rank: int | None = None) -> int:
        return sum(math.ceil(n / self.batch_size) for n in self.worker_rows(rank))

    def min_batches_per_epoch(self) -> int:
        """Batches per epoch of the rank with the fewest; the same number on every rank."""
        return min(self.batches_per_epoch(r) for r in range(self.world_size))

    def worker_skips(self, samples_consumed: int) -> tuple[list[int], int]:
        """After this rank consumed `samples_consumed` rows of the epoch: how many rows of its
        sequence each worker has already delivered, and which worker's batch comes next."""
        rows = self.worker_rows()
        counts = [math.ceil(n / self.batch_size) for n in rows]
        skips, remaining, next_worker = [0] * self.workers, samples_consumed, 0
        for w, t in round_robin(counts):
            if remaining <= 0:
                next_worker = w
                break
            size = min(self.batch_size, rows[w] - t * self.batch_size)
            if size > remaining:
                raise KdcacheError(f"stream position {samples_consumed} is not at a batch boundary for batch size "
                                   f"{self.batch_size}; resume with the batch size the checkpoint was made with")
            skips[w] += size
            remaining -= size
        if remaining > 0:
            raise KdcacheError(f"stream position {samples_consumed} is beyond the end of epoch {self.epoch} "
                               f"({sum(rows)} rows on this rank); the checkpoint does not belong to this cache/setup")
        return skips, next_worker

    # -- reading ------------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        cols = [EXAMPLE_ID, INPUT_IDS, POSITIONS, LABELS]
        if self.soft_targets:
            cols += list(soft_target_columns(targets_of(self.cache.manifest)["kind"]))
        if self.cache.has_token_type_ids:
            cols.append(TOKEN_TYPE_IDS)
        return cols

    def _read_group(self, index: int) -> pa.Table:
        if self._last_group is not None and self._last_group[0] == index:
            return self._last_group[1]
        group = self.cache.row_groups[index]
        if group.shard in self._files:
            self._files[group.shard] = self._files.pop(group.shard)  # most recently used last
        else:
            # An open ParquetFile keeps its read buffers (~4 MiB at k = 64): holding one per shard
            # would grow with the cache, so only the most recently used stay open.
            while len(self._files) >= OPEN_SHARDS:
                self._files.pop(next(iter(self._files)))
            self._files[group.shard] = open_shard(self.cache.shard_paths[group.shard])
        try:
            # One thread: a stream runs inside a DataLoader worker, and Arrow's pool only adds contention.
            table = self._files[group.shard].read_row_group(group.group, columns=self._columns(), use_threads=False)
        except READ_ERRORS as e:  # a page CRC mismatch, or a flip that broke decoding first
            entry = sorted(self.cache.manifest["shards"], key=lambda s: s["index"])[group.shard]
            raise corrupt_shard_error(self.cache.dir, entry, e) from None
        self._last_group = (index, table)
        return table

    def group_order(self, epoch: int) -> np.ndarray:
        n = len(self.cache.row_groups)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _window_rows(self, epoch: int, order: np.ndarray, starts: np.ndarray, lo: int, hi: int) -> pa.Table:
        """Rows [lo, hi) of the epoch's virtual row sequence, as one table (chunked)."""
        pieces = []
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        for j in range(first, len(order)):
            g_start = int(starts[j])
            if g_start >= hi:
                break
            table = self._read_group(int(order[j]))
            a, b = max(lo, g_start) - g_start, min(hi, g_start + table.num_rows) - g_start
            pieces.append(table.slice(a, b - a))
        return pa.concat_tables(pieces)

    def worker_sequence(self, worker: int, skip: int = 0):
        """This rank's worker `worker`: its rows for the current epoch, in order, starting after
        the first `skip` rows, as (decoded window, row indices into it) pairs."""
        epoch = self.epoch
        order = self.group_order(epoch)
        sizes = np.array([self.cache.row_groups[i].rows for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        block = self.rank * self.workers + worker
        lo, hi = block_bounds(self.cache.num_rows, self.world_size * self.workers, block)
        for window, w_lo in enumerate(range(lo, hi, self.shuffle_buffer)):
            w_hi = min(w_lo + self.shuffle_buffer, hi)
            if skip >= w_hi - w_lo:  # whole window already consumed: not even read
                skip -= w_hi - w_lo
                continue
            table = self._window_rows(epoch, order, starts, w_lo, w_hi)
            # Decoded once per window; the shuffle is then only an order of row indices.
            decoded = DecodedRows(table, soft_targets=self.soft_targets)
            del table  # the decoded copy is all that is needed now; don't hold both while yielding
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, block, window]).permutation(decoded.num_rows)
            else:
                rows = np.arange(decoded.num_rows)
            yield decoded, rows[skip:]
            skip = 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"CacheStream was built for {self.workers} workers but runs in {workers}; "
                               "pass the DataLoader's num_workers to CacheStream")
        self._files, self._last_group = {}, None  # never share file handles across processes
        skips, next_worker = self.worker_skips(self.start_sample)
        # A fresh DataLoader asks its worker 0 first; rotating the roles makes that the worker
        # whose batch comes next, so a restored stream continues the same round-robin.
        worker = (worker + next_worker) % workers
        skip = skips[worker]
        pending, pending_rows = [], 0
        for decoded, rows in self.worker_sequence(worker, skip):
            offset = 0
            while offset < len(rows):
                take = min(self.batch_size - pending_rows, len(rows) - offset)
                pending.append((decoded, rows[offset:offset + take]))
                pending_rows += take
                offset += take
                if pending_rows == self.batch_size:
                    yield collate(pending, pad_id=self.cache.pad_id)
                    pending, pending_rows = [], 0
        if pending_rows:
            yield collate(pending, pad_id=self.cache.pad_id)


def worker_message(error: KdcacheError) -> str:
    """The one-line message of a KdcacheError raised in a DataLoader worker: torch re-raises it
    in the main process wrapped with the worker's traceback; the message is its last line."""
    text = str(error)
    marker = "KdcacheError: "
    if "Traceback" in text and marker in text:
        return text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
    return text


class StreamLoader:
    """A DataLoader over a CacheStream that knows its position (seed, epoch, samples consumed).

    Iterating yields the rest of the current epoch; `next_epoch()` moves on. The position is
    updated as each batch is handed out, so a checkpoint taken after processing a batch
    resumes at the sample after it.
    """

    def __init__(self, stream: CacheStream, *, pin_memory: bool = False, prefetch_factor: int = 4):
        self.stream = stream
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.samples, self.batches = 0, 0, 0

    def __iter__(self):
        self.stream.set_position(self.epoch, self.samples)
        extra = {"prefetch_factor": self.prefetch_factor} if self.stream.num_workers > 0 else {}
        # A private generator: creating the loader must not draw from the global torch RNG,
        # or resuming would shift dropout masks relative to an uninterrupted run.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.stream.num_workers,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0), **extra)
        try:
            for batch in loader:
                self.samples += batch["num_rows"]
                self.batches += 1
                yield batch
        except KdcacheError as e:
            raise KdcacheError(worker_message(e)) from None

    def next_epoch(self) -> None:
        self.epoch, self.samples, self.batches = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        s = self.stream
        return {"seed": s.seed, "epoch": self.epoch, "samples": self.samples, "batches": self.batches,
                "batch_size": s.batch_size, "world_size": s.world_size, "num_workers": s.num_workers}

    def load_state_dict(self, state: dict) -> None:
        s = self.stream
        for key, have in (("seed", s.seed), ("batch_size", s.batch_size), ("world_size", s.world_size),
                          ("num_workers", s.num_workers)):
            if state[key] != have:
                raise KdcacheError(f"the checkpoint's stream was made with {key}={state[key]}, this run has {have}; "
                                   f"resume with the same {key.replace('_', ' ')} to continue exactly")
        self.epoch, self.samples, self.batches = int(state["epoch"]), int(state["samples"]), int(state["batches"])
