"""Encoding, compressing and writing shards on a background thread, overlapping the next forwards.

Arrow/Parquet encoding and zstd release the GIL, so the teacher keeps running while a shard is
written. The queue is short so at most one finished shard waits in memory.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..cache import schema as S
from ..cache.kinds import kind_for_columns
from ..cache.kinds.base import concat, list_array
from ..cache.shards import write_shard
from ..cache.storage import location


def build_table(results: list, arrow_schema: pa.Schema, k: int) -> pa.Table:
    """results: (Row, topk_ids (n, k) int, topk_logprobs (n, k) float16[, samples]), in any order;
    samples (sampled kinds) = (entries per position (n,), ids, log-probs, counts), flat over the
    row's entries. The top-k pair is None for the `sample` kind. The target kind's columns are
    encoded by the kind (`TargetKind.encode`). A selected cache (soft_mask column) has a fifth item,
    the row's soft_mask, and its soft parts cover only the selected targets.

    Rows are written in example_id order, so a shard's bytes never depend on batching.
    """
    results = sorted(results, key=lambda r: r[0].example_id)
    rows = [r[0] for r in results]
    n_pos = [len(r.positions) for r in rows]
    field = arrow_schema.field
    names = arrow_schema.names
    columns = {
        S.EXAMPLE_ID: pa.array([r.example_id for r in rows], pa.int64()),
        S.INPUT_IDS: list_array([len(r.input_ids) for r in rows], concat([r.input_ids for r in rows], np.int64),
                                field(S.INPUT_IDS).type),
        S.POSITIONS: list_array(n_pos, concat([r.positions for r in rows], np.int64), field(S.POSITIONS).type),
        S.LABELS: list_array(n_pos, concat([r.labels for r in rows], np.int32), field(S.LABELS).type),
    }
    n_soft = n_pos  # targets with soft targets per row: all of them, unless the cache selects (format v3)
    if S.SOFT_MASK in names:
        columns[S.SOFT_MASK] = list_array(n_pos, concat([r[4] for r in results], np.bool_), field(S.SOFT_MASK).type)
        n_soft = [int(r[4].sum()) for r in results]
    kind = kind_for_columns(names)  # the target kind encodes its own columns (kdcache/cache/kinds/)
    if kind is not None:
        columns.update(kind.encode(results, n_soft, field, k))
    if S.TOKEN_TYPE_IDS in names:
        columns[S.TOKEN_TYPE_IDS] = list_array([len(r.input_ids) for r in rows],
                                               concat([r.token_type_ids for r in rows], np.int64), field(S.TOKEN_TYPE_IDS).type)
    return pa.Table.from_arrays([columns[name] for name in names], schema=arrow_schema)


class ShardWriter:
    """Background writers: submit(index, results) returns at once; errors surface on the next call.

    On a GPU the teacher outruns one writer thread (Parquet/zstd encoding of top-k rows runs at
    ~100k positions/s per core), so several threads can write different shards at once; shards
    are independent files, so the cache is the same whatever the thread count. Memory stays
    bounded: at most `threads` shards queued plus `threads` being written.
    """

    def __init__(self, cache_dir: Path, arrow_schema: pa.Schema, k: int, on_written=None, threads: int = 1):
        self.cache_dir, self.schema, self.k, self.on_written = location(cache_dir), arrow_schema, k, on_written
        self.queue: queue.Queue = queue.Queue(maxsize=threads)
        self.error: BaseException | None = None
        self.callback_lock = threading.Lock()  # on_written rewrites the manifest: one at a time
        self.threads = [threading.Thread(target=self._work, name=f"kdcache-shard-writer-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _work(self):
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            index, results = item
            try:
                stats = write_shard(self.cache_dir, index, build_table(results, self.schema, self.k))
                if self.on_written is not None:
                    with self.callback_lock:
                        self.on_written(stats)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def _raise(self):
        if self.error is not None:
            raise self.error

    def submit(self, index: int, results: list) -> None:
        self._raise()
        self.queue.put((index, results))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()
