"""Streaming a cache into training: a torch IterableDataset over its Parquet shards.

Design (after mosaicml/streaming, applied to soft targets):
- The unit of I/O is a Parquet row group; memory holds a few row groups plus one shuffle
  window of rows, whatever the cache size.
- Which rows a reader reads, and in which order, is pure arithmetic in kdcache.cache.partition:
  an epoch's row order is one sequence (row groups permuted by (seed, epoch), then rows permuted
  within windows of `shuffle_buffer` rows) that does not depend on the number of readers; each
  loader worker of each rank reads one contiguous part of it, so a window is decoded by about one
  reader, and every row is read by exactly one reader per epoch.
- Every rank reads the same number of micro-batches per epoch (steps x grad_accum), none empty;
  DataLoader returns worker batches round-robin, so a rank's batch order is fixed.
- The position is (epoch, stage, micro-batches consumed): each worker computes how many of its
  rows were already consumed and skips them without decoding. Under another geometry the
  epoch's unread rows are re-partitioned (elastic resume).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import KdcacheError
from .collate import DecodedRows, collate
from .manifest import CacheManifest, read_manifest_view, resolve_inside
from .partition import Geometry, Stage, group_order, window_order
from .storage import ObjectPath, local_dir, location, parquet_file
from .schema import (
    EXAMPLE_ID, INPUT_IDS, LABELS, POSITIONS, SOFT_MASK, TOKEN_TYPE_IDS, schema_for_manifest,
)
from .kinds import TargetKind, kind_of
from .shards import READ_ERRORS, corrupt_shard_error, open_shard
from .verify import check_rows

DEFAULT_SHUFFLE_BUFFER = 2048
# Shard files a stream keeps open at once: re-opening one costs only a footer read.
OPEN_SHARDS = 1
# From a bucket, fetch the next shuffle window while decoding this one (see CacheStream.read_spans).
BUCKET_READ_AHEAD = True


@dataclass(frozen=True)
class RowGroup:
    shard: int   # position in OpenCache.shard_paths
    group: int   # row group within that shard
    rows: int


@dataclass
class OpenCache:
    """A cache whose manifest and shard list were checked: every listed shard is there, with
    the size the manifest records, a readable Parquet footer, the row count and the schema."""
    dir: Path | ObjectPath
    view: CacheManifest  # the typed manifest; .manifest is its raw dict
    shard_paths: list[Path | ObjectPath]
    row_groups: list[RowGroup]

    @property
    def manifest(self) -> dict:
        return self.view.raw

    @property
    def num_rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    @property
    def task(self) -> str:
        return self.view.task

    @property
    def k(self) -> int:
        return self.view.k

    @property
    def pad_id(self) -> int:
        return self.view.pad_id

    @property
    def tokenizer_dir(self) -> Path:
        # On local disk: the Hugging Face loaders read folders (copied once from a bucket).
        return local_dir(resolve_inside(self.dir, self.view.tokenizer_dir, "tokenizer.dir"))

    @property
    def has_token_type_ids(self) -> bool:
        return self.view.token_type_ids

    @property
    def target_kind(self) -> str:
        return self.view.target_kind  # top-k, sample or top-k+sample

    @property
    def kind(self) -> TargetKind:
        """The target kind's implementation (kdcache/cache/kinds/)."""
        return kind_of(self.view.target_kind)

    @property
    def num_positions(self) -> int:
        return sum(int(shard.get("positions", 0)) for shard in self.view.shards)

    def load_tokenizer(self):
        """The cache's tokenizer (the one its ids are in), as a transformers tokenizer."""
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.tokenizer_dir)


def open_cache(cache_dir: str | Path) -> OpenCache:
    """Check a cache before training on it; every problem is a one-line KdcacheError."""
    cache_dir = location(cache_dir)
    manifest = read_manifest_view(cache_dir)
    shards = manifest.shards
    if not manifest.complete:
        raise KdcacheError(
            f"cache {cache_dir} is incomplete ({len(shards)} of {manifest.num_shards or '?'} shards written); "
            "finish it by re-running the same `kdcache dump-logits` command")
    if not shards:
        raise KdcacheError(f"cache {cache_dir} lists no shards; re-create it with `kdcache dump-logits`")
    expected = schema_for_manifest(manifest.raw)
    paths, groups = [], []
    resolve_inside(cache_dir, manifest.tokenizer_dir, "tokenizer.dir")
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
            meta = parquet_file(path).metadata
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


class CacheStream(IterableDataset):
    """Batches of sparse targets from a cache, for one rank; see the module docstring.

    Use it through StreamLoader (which tracks the position), or in a DataLoader with
    batch_size=None and num_workers equal to the `num_workers` given here.
    """

    def __init__(self, cache: OpenCache | str | Path, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, soft_targets: bool = True,
                 grad_accum: int = 1):
        self.cache = cache if isinstance(cache, OpenCache) else open_cache(cache)
        if batch_size < 1:
            raise KdcacheError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.soft_targets = soft_targets
        self.grad_accum = grad_accum
        self.epoch, self.stage, self.batches_done = 0, self.first_stage(), 0
        self._files: dict[int, pq.ParquetFile] = {}
        # Row groups that passed check_rows: kept across epochs in-process; DataLoader workers start
        # afresh each epoch, so there each group is checked once per epoch (BENCHMARKS.md).
        self._checked: set[int] = set()
        self._last_group: tuple[int, pa.Table] | None = None

    # -- position ---------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.world_size, self.workers, self.batch_size, self.grad_accum)

    def first_stage(self) -> Stage:
        """A whole epoch, spread over this stream's geometry."""
        return Stage.first(self.cache.num_rows, self.geometry)

    def set_position(self, epoch: int, stage: Stage | None = None, batches: int = 0) -> None:
        """Where the next iteration starts: `batches` micro-batches (of every rank) into `stage` of
        epoch `epoch` (a whole epoch when `stage` is None)."""
        self.epoch, self.stage, self.batches_done = int(epoch), stage or self.first_stage(), int(batches)
        if self.stage.geometry != self.geometry:
            raise ValueError("a stage is read with the geometry it was made for")

    def steps_per_epoch(self) -> int:
        return self.first_stage().steps

    def batches_per_epoch(self) -> int:
        """Micro-batches each rank reads per epoch: the same on every rank."""
        return self.first_stage().micro_batches

    # -- reading ------------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        cols = [EXAMPLE_ID, INPUT_IDS, POSITIONS, LABELS]
        if self.soft_targets:
            if self.cache.view.select_positions is not None:
                cols.append(SOFT_MASK)  # which targets the kind's columns cover (format v3)
            cols += list(self.cache.kind.stored_columns(self.cache.view.draw_logprobs))
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
            entry = self.cache.view.shards[group.shard]
            raise corrupt_shard_error(self.cache.dir, entry, e) from None
        if index not in self._checked:  # a checksum-valid shard can still hold an id >= vocab: once per group
            problem = check_rows(table, self.cache.view)
            if problem:
                raise corrupt_shard_error(self.cache.dir, self.cache.view.shards[group.shard], problem)
            self._checked.add(index)
        self._last_group = (index, table)
        return table

    def group_order(self, epoch: int) -> np.ndarray:
        return group_order(len(self.cache.row_groups), self.seed, epoch, self.shuffle)

    def read_spans(self, epoch: int, spans):
        """Rows of epoch `epoch`'s sequence (see kdcache.cache.partition), span by span, as
        (decoded window, row indices into it) pairs; a window is decoded once while it is in use.

        From a bucket, the next window's row groups are fetched while this one is consumed (one
        window ahead, in one background thread: reads stay sequential, memory stays bounded)."""
        order = self.group_order(epoch)
        sizes = np.array([self.cache.row_groups[i].rows for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        total, width = self.cache.num_rows, self.shuffle_buffer
        visits = [(window, lo, hi) for lo, hi in spans for window in range(lo // width, (hi - 1) // width + 1)]
        windows = [w for i, (w, _, _) in enumerate(visits) if i == 0 or visits[i - 1][0] != w]

        def fetch(k: int) -> pa.Table:
            w_lo = windows[k] * width
            return self._window_rows(epoch, order, starts, w_lo, min(w_lo + width, total))

        remote = isinstance(self.cache.dir, ObjectPath)
        ahead = ThreadPoolExecutor(1) if BUCKET_READ_AHEAD and remote and len(windows) > 1 else None
        queued: dict[int, Future] = {}
        current, k = None, -1  # (window index, decoded rows, their order); position in `windows`
        try:
            for window, lo, hi in visits:
                w_lo = window * width
                w_hi = min(w_lo + width, total)
                if current is None or current[0] != window:
                    current, k = None, k + 1  # drop the previous window before decoding the next
                    if ahead is None:
                        table = fetch(k)
                    else:
                        future = queued.pop(k, None) or ahead.submit(fetch, k)
                        if k + 1 < len(windows):
                            queued[k + 1] = ahead.submit(fetch, k + 1)
                        table = future.result()
                    decoded = DecodedRows(table, soft_targets=self.soft_targets, kind=self.cache.kind)
                    del table  # the decoded copy is all that is needed now; don't hold both
                    current = (window, decoded, window_order(w_hi - w_lo, self.seed, epoch, window, self.shuffle))
                yield current[1], current[2][max(lo, w_lo) - w_lo:min(hi, w_hi) - w_lo]
        finally:
            if ahead is not None:
                ahead.shutdown(wait=True, cancel_futures=True)

    def worker_sequence(self, worker: int, skip: int = 0):
        """This rank's worker `worker`: its rows of the current stage, in order, after the first
        `skip`, as (decoded window, row indices into it) pairs."""
        return self.read_spans(self.epoch, self.stage.worker_spans(self.rank, worker, skip))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"CacheStream was built for {self.workers} workers but runs in {workers}; "
                               "pass the DataLoader's num_workers to CacheStream")
        self._files, self._last_group = {}, None  # never share file handles across processes
        done = self.batches_done
        # A fresh DataLoader asks its worker 0 first; rotating the roles makes that the worker
        # whose micro-batch comes next, so a restored stream continues the same round-robin.
        worker = (worker + done) % workers
        plan = self.stage.rank_batches(self.rank)
        skip = plan.total(done, worker, workers)
        first = done + (worker - done) % workers  # this worker's first micro-batch still to read
        sizes = (plan.size(j) for j in range(first, plan.count, workers))
        want = next(sizes, 0)
        pending, pending_rows = [], 0
        for decoded, rows in self.worker_sequence(worker, skip):
            offset = 0
            while offset < len(rows):
                take = min(want - pending_rows, len(rows) - offset)
                pending.append((decoded, rows[offset:offset + take]))
                pending_rows += take
                offset += take
                if pending_rows == want:
                    yield collate(pending, pad_id=self.cache.pad_id)
                    pending, pending_rows, want = [], 0, next(sizes, 0)

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


def worker_message(error: KdcacheError) -> str:
    """The one-line message of a KdcacheError raised in a DataLoader worker: torch re-raises it
    in the main process wrapped with the worker's traceback; the message is its last line."""
    text = str(error)
    marker = "KdcacheError: "
    if "Traceback" in text and marker in text:
        return text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
    return text


class StreamLoader:
    """A DataLoader over a CacheStream that knows its position: (epoch, stage, micro-batches
    consumed), the same on every rank (see kdcache.cache.partition).

    Iterating yields the rest of the current epoch; `next_epoch()` moves on. The position is
    updated as each batch is handed out, so a checkpoint taken after processing a batch resumes
    at the micro-batch after it; `load_state_dict` under another geometry (processes, workers,
    micro-batch size with the same global batch) re-partitions the epoch's unread rows.
    """

    def __init__(self, stream: CacheStream, *, pin_memory: bool = False, prefetch_factor: int = 4):
        self.stream = stream
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.stage, self.batches = 0, stream.first_stage(), 0

    def __iter__(self):
        self.stream.set_position(self.epoch, self.stage, self.batches)
        extra = {"prefetch_factor": self.prefetch_factor} if self.stream.num_workers > 0 else {}
        # A private generator: creating the loader must not draw from the global torch RNG,
        # or resuming would shift dropout masks relative to an uninterrupted run.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.stream.num_workers,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0), **extra)
        try:
            for batch in loader:
                self.batches += 1
                yield batch
        except KdcacheError as e:
            raise KdcacheError(worker_message(e)) from None

    def next_epoch(self) -> None:
        self.epoch, self.stage, self.batches = self.epoch + 1, self.stream.first_stage(), 0

    def _order_keys(self) -> dict:
        """What the epoch's row order depends on: a resumed run must have the same."""
        s = self.stream
        return {"seed": s.seed, "shuffle": s.shuffle, "shuffle_buffer": s.shuffle_buffer, "rows": s.cache.num_rows}

    def state_dict(self) -> dict:
        return {**self._order_keys(), "epoch": self.epoch, "stage": self.stage.to_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        for key, have in self._order_keys().items():
            if state.get(key) != have:
                raise KdcacheError(f"the checkpoint's stream was made with {key}={state.get(key)}, this run has {have}; "
                                   f"resume with the same {key.replace('_', ' ')} to continue exactly")
        stage = Stage.from_state(state["stage"])
        self.stage, self.batches = stage.resume(int(state["batches"]), self.stream.geometry)
        self.epoch = int(state["epoch"])
