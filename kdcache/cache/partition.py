"""Which rows each reader of a cache reads, in which order: pure arithmetic, no files.

An epoch's row order is one global sequence that does not depend on how many processes read it:
- the row groups are put in a permutation drawn from (seed, epoch): the "virtual" sequence;
- that sequence is cut into windows of `window` rows, and the rows of window i are put in a
  permutation drawn from (seed, epoch, i): the epoch sequence (second level of the shuffle).

A *stage* is what is left of an epoch, as spans [lo, hi) of the epoch sequence, together with the
optimizer steps left for it and the geometry reading it (ranks x loader workers, micro-batch size,
accumulation). A stage's rows are split into one contiguous block per rank; each rank reads
exactly steps x grad_accum micro-batches (the same number on every rank, none empty; full ones
first). Micro-batch j of a rank comes from its loader worker j % workers (the order in which a
DataLoader hands out worker batches); each worker reads one contiguous part of its rank's block.
Readers thus read contiguous runs of the sequence (a window is decoded by about one reader).

A position is (epoch, stage, micro-batches each rank has consumed in the stage), the same on every
rank. Resuming with the same geometry continues the stage; with another geometry the rows not yet
read become a new stage spread over the new geometry (after mosaicml/streaming's elastic resume:
the unread rest of the epoch is re-partitioned). This is exact, no row read twice or skipped, as
long as the global batch (ranks x accumulation x micro-batch) stays the same, which also keeps the
steps per epoch and so the learning-rate schedule. Otherwise `resume` refuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import KdcacheError

Span = tuple[int, int]


def block_bounds(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, end) of block `part` when `total` items are split into `parts` contiguous blocks."""
    return total * part // parts, total * (part + 1) // parts


def group_order(num_groups: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's order of row groups."""
    if not shuffle:
        return np.arange(num_groups)
    return np.random.default_rng([seed, epoch]).permutation(num_groups)


def window_order(size: int, seed: int, epoch: int, window: int, shuffle: bool = True) -> np.ndarray:
    """The order of the rows of window `window` (of `size` rows) in the epoch sequence."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, epoch, window]).permutation(size)


@dataclass(frozen=True)
class MicroBatches:
    """`count` micro-batches holding `rows` rows, each of 1..batch_size rows: as many full ones as
    possible first, the rest shared evenly by the last ones so that none is empty. In closed form,
    since a rank may read millions of micro-batches in an epoch."""
    rows: int
    count: int
    batch_size: int

    def __post_init__(self):
        if not self.count <= self.rows <= self.count * self.batch_size:
            raise ValueError(f"{self.rows} rows do not fit {self.count} micro-batches of 1..{self.batch_size}")

    @property
    def full(self) -> int:
        if self.count == 0:
            return 0
        return self.count if self.batch_size == 1 else min(self.count, (self.rows - self.count) // (self.batch_size - 1))

    def size(self, j: int) -> int:
        full = self.full
        if j < full:
            return self.batch_size
        rest, left = self.rows - full * self.batch_size, self.count - full
        return rest // left + (j - full < rest % left)

    def total(self, n: int | None = None, worker: int = 0, workers: int = 1) -> int:
        """Rows in micro-batches j < n with j % workers == worker."""
        n = self.count if n is None else min(n, self.count)
        full = self.full
        rest, left = self.rows - full * self.batch_size, self.count - full
        small, extra = (rest // left, rest % left) if left else (0, 0)

        def upto(x: int) -> int:  # how many j < x have j % workers == worker
            return max(0, (x - worker + workers - 1) // workers)

        def between(a: int, b: int) -> int:
            return upto(min(b, n)) - upto(min(a, n))

        return (self.batch_size * between(0, full) + (small + 1) * between(full, full + extra)
                + small * between(full + extra, self.count))

    def sizes(self, worker: int = 0, workers: int = 1) -> list[int]:
        return [self.size(j) for j in range(worker, self.count, workers)]


@dataclass(frozen=True)
class Geometry:
    """How a stage is read: ranks, loader workers per rank (DataLoader num_workers 0 reads as 1),
    micro-batch size and micro-batches per optimizer step."""
    world: int
    workers: int
    batch_size: int
    grad_accum: int = 1

    def __post_init__(self):
        for name in ("world", "workers", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise KdcacheError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")

    @property
    def global_batch(self) -> int:
        return self.world * self.grad_accum * self.batch_size

    def describe(self) -> str:
        return (f"{self.world} process(es) x {self.grad_accum} accumulation x micro-batch {self.batch_size}"
                f" = {self.global_batch} rows per step, {self.workers} loader worker(s)")


@dataclass(frozen=True)
class Stage:
    """What is left of an epoch and who reads it (see the module docstring)."""
    spans: tuple[Span, ...]   # the unread rows, as [lo, hi) ranges of the epoch sequence, in order
    steps: int                # optimizer steps left in the epoch for them
    geometry: Geometry

    def __post_init__(self):
        g, rows = self.geometry, self.rows
        micro = self.micro_batches
        fewest, most = rows // g.world, -(-rows // g.world)
        if (micro == 0) != (rows == 0) or fewest < micro or most > micro * g.batch_size:
            raise KdcacheError(
                f"{rows} rows cannot be spread over {self.steps} step(s) of {g.describe()} without an empty or "
                "oversized micro-batch; use fewer processes, a smaller --grad-accum or a larger --batch-size")

    @classmethod
    def first(cls, num_rows: int, geometry: Geometry) -> Stage:
        """A whole epoch: ceil(rows / global batch) steps, the last one possibly short."""
        return cls(((0, num_rows),), math.ceil(num_rows / geometry.global_batch), geometry)

    @property
    def rows(self) -> int:
        return sum(hi - lo for lo, hi in self.spans)

    @property
    def micro_batches(self) -> int:
        """Micro-batches every rank reads in this stage."""
        return self.steps * self.geometry.grad_accum

    def rank_batches(self, rank: int) -> MicroBatches:
        start, end = block_bounds(self.rows, self.geometry.world, rank)
        return MicroBatches(end - start, self.micro_batches, self.geometry.batch_size)

    def worker_bounds(self, rank: int, worker: int) -> tuple[int, int]:
        """[start, end) of this worker's rows, as positions within the stage."""
        start = block_bounds(self.rows, self.geometry.world, rank)[0]
        batches, workers = self.rank_batches(rank), self.geometry.workers
        start += sum(batches.total(worker=w, workers=workers) for w in range(worker))
        return start, start + batches.total(worker=worker, workers=workers)

    def worker_consumed(self, rank: int, batches: int) -> list[int]:
        """Rows each worker of `rank` has delivered once the rank consumed `batches` micro-batches."""
        plan, workers = self.rank_batches(rank), self.geometry.workers
        return [plan.total(batches, w, workers) for w in range(workers)]

    def to_epoch(self, start: int, end: int) -> list[Span]:
        """Stage positions [start, end) as spans of the epoch sequence."""
        out, offset = [], 0
        for lo, hi in self.spans:
            a, b = max(start, offset), min(end, offset + hi - lo)
            if a < b:
                out.append((lo + a - offset, lo + b - offset))
            offset += hi - lo
        return out

    def worker_spans(self, rank: int, worker: int, skip: int = 0) -> list[Span]:
        """The epoch-sequence spans worker `worker` of `rank` reads, after its first `skip` rows."""
        start, end = self.worker_bounds(rank, worker)
        return self.to_epoch(start + skip, end)

    def unread(self, batches: int) -> tuple[Span, ...]:
        """The spans no reader has delivered once every rank consumed `batches` micro-batches."""
        spans = []
        for rank in range(self.geometry.world):
            for worker, done in enumerate(self.worker_consumed(rank, batches)):
                spans += self.worker_spans(rank, worker, done)
        merged: list[Span] = []
        for lo, hi in spans:  # adjacent runs become one span, keeping the state small
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return tuple(merged)

    def resume(self, batches: int, geometry: Geometry) -> tuple[Stage, int]:
        """(stage, micro-batches consumed in it) to continue from `batches` under `geometry`."""
        if geometry == self.geometry:
            return self, batches
        old = self.geometry
        if geometry.global_batch != old.global_batch:
            raise KdcacheError(
                f"cannot resume exactly: the checkpoint's global batch is {old.describe()}, this run has "
                f"{geometry.describe()}; keep processes x --grad-accum x --batch-size = {old.global_batch}")
        if batches % old.grad_accum:
            raise KdcacheError(f"cannot resume exactly: the checkpoint is {batches % old.grad_accum} micro-batch(es) "
                               "into an optimizer step; resume with the original geometry")
        spans, steps = self.unread(batches), self.steps - batches // old.grad_accum
        try:
            return Stage(spans, steps, geometry), 0
        except KdcacheError:
            rows = sum(hi - lo for lo, hi in spans)
            raise KdcacheError(
                f"cannot resume exactly: the epoch's {rows} unread rows do not fill {steps} step(s) of "
                f"{geometry.describe()} without an empty micro-batch; resume with {old.describe()} until the "
                "epoch ends, or with a smaller --grad-accum") from None

    # -- (de)serialisation for checkpoints: plain ints and lists only ----------------------------
    def to_state(self) -> dict:
        g = self.geometry
        return {"spans": [list(s) for s in self.spans], "steps": self.steps, "world": g.world,
                "workers": g.workers, "batch_size": g.batch_size, "grad_accum": g.grad_accum}

    @classmethod
    def from_state(cls, state: dict) -> Stage:
        geometry = Geometry(int(state["world"]), int(state["workers"]), int(state["batch_size"]),
                            int(state["grad_accum"]))
        return cls(tuple((int(lo), int(hi)) for lo, hi in state["spans"]), int(state["steps"]), geometry)
