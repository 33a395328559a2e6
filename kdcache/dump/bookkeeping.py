"""Rank 0's manifest during a dump, at a cost per shard that does not grow with the cache.

Sidecars are the truth (a shard is complete once its sidecar exists), so the manifest written while a
dump runs is only a progress record: a killed run's resume lists `data/` once and finds every complete
shard whatever the manifest says. Rewriting the whole manifest after every shard (and listing `data/`
for other ranks' sidecars each time) costs O(shards) per shard, O(shards^2) in all: terabytes of
manifest writes and millions of bucket LIST calls at pre-training scale. Here the manifest is rewritten
once the shards written since the last rewrite reach `every` and a fixed share of those already
recorded (so the rewrites' total size is a constant multiple of the final manifest: O(1) per shard
amortised), or `seconds` after the last rewrite (a slow dump's manifest stays fresh), and always at the
end. Only under torchrun, where other ranks write shards, does a rewrite list `data/`; a sidecar is read
once per shard.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from ..cache.manifest import manifest_path, write_cache_json
from ..errors import KdcacheError
from .record import with_shards

EVERY = 32        # at least this many new shards per rewrite ...
GROWTH = 8        # ... and at least 1/GROWTH of the shards already recorded,
SECONDS = 300.0   # unless this long has passed since the last rewrite


class ManifestKeeper:
    """`add(stats)` after each shard this process writes; `final()` once every rank is done."""

    def __init__(self, out: Path, manifest: dict, known: dict, *, world: int = 1, every: int = EVERY,
                 growth: int = GROWTH, seconds: float = SECONDS, clock=time.monotonic):
        self.out, self.manifest, self.world = out, manifest, world
        self.known = dict(known)  # index -> sidecar stats of every shard found complete so far
        self.every, self.growth, self.seconds, self.clock = every, growth, seconds, clock
        self.pending = 0          # shards this process wrote since the last rewrite
        self.last = clock()
        self.rewrites = 0
        self.lock = threading.Lock()  # writer threads call add() concurrently

    def due(self) -> bool:
        new = self.pending * self.world  # other ranks write about as many shards as this one
        return new >= max(self.every, len(self.known) // self.growth) or \
            (self.pending > 0 and self.clock() - self.last >= self.seconds)

    def add(self, stats: dict) -> None:
        with self.lock:
            self.known[stats["index"]] = stats
            self.pending += 1
            if self.due():
                self.write(self.current(listing=self.world > 1))

    def current(self, listing: bool) -> dict:
        """The manifest with the shards known now; `listing`: first look in data/ for other ranks' shards
        (one listing; only sidecars not seen before are read)."""
        return with_shards(self.manifest, self.out, self.known, listing=listing)

    def write(self, manifest: dict) -> None:
        write_cache_json(manifest_path(self.out), manifest)
        self.pending, self.last = 0, self.clock()
        self.rewrites += 1

    def flush(self) -> None:
        """When the writer stops (a run stopped by an error too): record the shards this process completed
        since the last rewrite. Best effort: if even the manifest cannot be written, the error that stopped
        the run is the one reported, and the sidecars still say what is complete."""
        with self.lock:
            if self.pending:
                try:
                    self.write(self.current(listing=False))
                except (KdcacheError, OSError):
                    pass

    def final(self) -> dict:
        """The record of what data/ really holds, for the caller to complete and write: listed once and
        every sidecar read back, not taken from memory, so a store that accepted an upload and did not
        keep it leaves the cache incomplete (dump/confirm.py fails the run). One pass per session, O(1)
        per shard."""
        with self.lock:
            return with_shards(self.manifest, self.out)

