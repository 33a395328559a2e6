"""A cache's training stream for one process, as a loop consumes it: endless micro-batches,
each epoch reading every row once, with a position that checkpoints and restores exactly.

A thin layer over kdcache.cache.stream (CacheStream: the IterableDataset; StreamLoader: its
DataLoader with the position) that adds the epochs and the torchrun defaults.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..cache.stream import DEFAULT_SHUFFLE_BUFFER, CacheStream, OpenCache, StreamLoader, open_cache

DEFAULT_NUM_WORKERS = 2  # train-student's --num-workers: the batch order depends on it


class TrainStream:
    """Micro-batches of `cache` for this rank, epoch after epoch (iterate it as long as you train).

    rank / world_size default to torchrun's RANK / WORLD_SIZE. The order is fixed by (seed,
    epoch) and the geometry (world_size x grad_accum x batch_size, num_workers), so the same
    settings read the same batches as `kdcache train-student`. `state_dict()` after any batch,
    `load_state_dict()` before iterating: the stream continues at the next micro-batch, also
    under another world size or worker count with the same global batch (see kdcache.cache.partition).
    """

    def __init__(self, cache: OpenCache | str | Path, *, batch_size: int, seed: int = 0, grad_accum: int = 1,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = DEFAULT_NUM_WORKERS,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, soft_targets: bool = True, shuffle: bool = True,
                 pin_memory: bool = False):
        cache = cache if isinstance(cache, OpenCache) else open_cache(cache)
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.dataset = CacheStream(cache, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                   world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                                   soft_targets=soft_targets, grad_accum=grad_accum)
        self.loader = StreamLoader(self.dataset, pin_memory=pin_memory)

    def __iter__(self):
        while True:  # every rank reads the same number of micro-batches per epoch
            yield from self.loader
            self.loader.next_epoch()

    @property
    def cache(self) -> OpenCache:
        return self.dataset.cache

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def geometry(self):
        return self.dataset.geometry

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: ceil(rows / global batch), the last one possibly short."""
        return self.dataset.steps_per_epoch()

    def state_dict(self) -> dict:
        """The position (plain ints and lists: JSON-safe)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
