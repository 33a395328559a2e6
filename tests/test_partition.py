"""The stream's partition and shuffle arithmetic, without files: every row once per epoch, equal
micro-batch counts on every rank, and exact elastic resume across geometries."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdcache.cache.partition import Geometry, MicroBatches, Stage, group_order, window_order
from kdcache.errors import KdcacheError


def positions(spans):
    return [p for lo, hi in spans for p in range(lo, hi)]


def read_in_order(stage: Stage, batches: int | None = None) -> dict[int, list[list[int]]]:
    """Per rank, its micro-batches as lists of epoch positions, worked out independently of the
    stage's own consumed/unread arithmetic: each worker's rows are handed out in its batch sizes,
    and the rank takes micro-batch j from worker j % workers."""
    g = stage.geometry
    out = {}
    for rank in range(g.world):
        plan = stage.rank_batches(rank)
        queues = [positions(stage.worker_spans(rank, w)) for w in range(g.workers)]
        taken = [0] * g.workers
        got = []
        for j in range(plan.count if batches is None else batches):
            w, n = j % g.workers, plan.size(j)
            got.append(queues[w][taken[w]:taken[w] + n])
            taken[w] += n
        out[rank] = got
    return out


def test_micro_batch_sizes_fill_full_ones_first_and_never_empty():
    for rows, count, size in itertools.product(range(0, 45), range(0, 13), range(1, 7)):
        if not count <= rows <= count * size or (count == 0) != (rows == 0):
            with pytest.raises(ValueError):
                MicroBatches(rows, count, size)
            continue
        plan = MicroBatches(rows, count, size)
        sizes = plan.sizes()
        assert len(sizes) == count and sum(sizes) == rows and all(1 <= s <= size for s in sizes)
        # Full ones first; the rest as even as possible (differ by at most one, larger first).
        tail = [s for s in sizes if s != size] or [size]
        assert sizes == sorted(sizes, reverse=True) and max(tail) - min(tail) <= 1
        for workers in (1, 2, 3):
            for worker in range(workers):
                assert plan.sizes(worker, workers) == sizes[worker::workers]
                for n in range(count + 2):
                    assert plan.total(n, worker, workers) == sum(sizes[:n][worker::workers])


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 301, 1000])
@pytest.mark.parametrize("world,workers,batch,accum", [(1, 1, 8, 1), (2, 2, 8, 1), (3, 2, 5, 2), (4, 3, 1, 1),
                                                       (2, 1, 16, 3)])
def test_every_row_once_and_every_rank_reads_as_many_micro_batches(rows, world, workers, batch, accum):
    g = Geometry(world, workers, batch, accum)
    steps = -(-rows // (world * accum * batch))
    if rows // world < steps * accum:  # some rank would get an empty micro-batch: refused, not padded
        with pytest.raises(KdcacheError, match="cannot be spread"):
            Stage.first(rows, g)
        return
    stage = Stage.first(rows, g)
    assert stage.steps == steps
    read = read_in_order(stage)
    assert {len(b) for b in read.values()} == {stage.steps * accum}
    every = [p for r in range(world) for b in read[r] for p in b]
    assert sorted(every) == list(range(rows))
    assert all(1 <= len(b) <= batch for r in range(world) for b in read[r])
    # A worker reads one contiguous run: a window is decoded by about one reader.
    for r, w in itertools.product(range(world), range(workers)):
        assert len(stage.worker_spans(r, w)) <= 1


def test_unread_is_what_no_reader_has_delivered():
    stage = Stage.first(301, Geometry(2, 2, 8, 1))
    for batches in (0, 1, 5, 12, stage.micro_batches):
        read = read_in_order(stage, batches)
        delivered = {p for r in read for b in read[r] for p in b}
        assert sorted(positions(stage.unread(batches))) == sorted(set(range(301)) - delivered)


def resume_chain(rows: int, geometries: list[Geometry], cuts: list[int]) -> list[int]:
    """Read one epoch through a chain of resizes: `cuts[i]` steps under geometries[i], then resume
    under geometries[i + 1]; the last geometry reads to the end. Returns every position read."""
    stage, done = Stage.first(rows, geometries[0]), 0
    seen, steps = [], 0
    for i, g in enumerate(geometries):
        if i:
            stage, done = stage.resume(done, g)
        remaining = stage.micro_batches - done
        take = remaining if i == len(geometries) - 1 else cuts[i] * g.grad_accum
        read = read_in_order(stage, done + take)
        seen += [p for r in read for b in read[r][done:] for p in b]
        steps += take // g.grad_accum
        done += take
    assert steps == Stage.first(rows, geometries[0]).steps  # the schedule's steps per epoch are kept
    return seen


@pytest.mark.parametrize("rows", [301, 64, 1000])
def test_resize_two_by_two_to_one_by_three_and_back_reads_every_row_once(rows):
    two_by_two = Geometry(world=2, workers=2, batch_size=8, grad_accum=1)
    one_by_three = Geometry(world=1, workers=3, batch_size=8, grad_accum=2)  # same 16 rows per step
    back = Geometry(world=2, workers=2, batch_size=4, grad_accum=2)          # and again, smaller micro-batches
    steps = Stage.first(rows, two_by_two).steps
    for cuts in ([1, 1], [steps // 3, steps // 3], [0, steps - 1], [steps - 1, 0]):
        seen = resume_chain(rows, [two_by_two, one_by_three, back], cuts)
        assert sorted(seen) == list(range(rows)), cuts


def test_random_resize_chains_are_exact():
    rng = np.random.default_rng(0)
    shapes = [(w, a, b) for w in (1, 2, 3, 4, 6) for a in (1, 2, 3, 4) for b in range(2, 25) if w * a * b == 24]
    exact = 0
    for _ in range(60):
        rows = int(rng.integers(30, 400))
        chain = [Geometry(w, int(rng.integers(1, 4)), b, a) for w, a, b in
                 (shapes[i] for i in rng.integers(0, len(shapes), int(rng.integers(2, 5))))]
        steps = Stage.first(rows, chain[0]).steps
        cuts = [int(c) for c in rng.integers(0, max(1, steps // len(chain)), len(chain) - 1)]
        try:
            seen = resume_chain(rows, chain, cuts)
        except KdcacheError as e:  # an epoch tail too thin for the new micro-batch count: refused, never wrong
            assert "cannot resume exactly" in str(e) and "without an empty micro-batch" in str(e)
            continue
        assert sorted(seen) == list(range(rows))
        exact += 1
    assert exact >= 50


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_into_an_empty_stage():
    stage = Stage.first(301, Geometry(2, 2, 8, 1))
    rest, done = stage.resume(stage.micro_batches, Geometry(1, 3, 8, 2))
    assert (rest.rows, rest.steps, rest.micro_batches, done) == (0, 0, 0, 0)
    assert read_in_order(rest) == {0: []}


def test_same_geometry_continues_the_stage_itself():
    stage = Stage.first(301, Geometry(2, 2, 8, 1))
    assert stage.resume(7, Geometry(2, 2, 8, 1)) == (stage, 7)


def test_a_resume_that_cannot_be_exact_is_refused_saying_why():
    stage = Stage.first(301, Geometry(2, 2, 8, 2))
    with pytest.raises(KdcacheError, match="global batch .* 32 .* keep processes x --grad-accum x --batch-size = 32"):
        stage.resume(4, Geometry(1, 2, 8, 2))
    with pytest.raises(KdcacheError, match="into an optimizer step"):
        stage.resume(3, Geometry(1, 2, 16, 2))


def test_state_round_trips_as_plain_data():
    stage, _ = Stage.first(301, Geometry(2, 2, 8, 1)).resume(6, Geometry(1, 3, 16, 1))
    state = stage.to_state()
    assert all(isinstance(v, (int, list)) for v in state.values())
    assert Stage.from_state(state) == stage


def test_orders_depend_on_seed_and_epoch_only():
    a = group_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and (a == group_order(50, seed=1, epoch=0)).all()
    assert (a != group_order(50, seed=1, epoch=1)).any() and (a != group_order(50, seed=2, epoch=0)).any()
    assert (group_order(50, 1, 0, shuffle=False) == np.arange(50)).all()
    w = window_order(40, seed=1, epoch=0, window=3)
    assert sorted(w) == list(range(40)) and (w != window_order(40, seed=1, epoch=0, window=4)).any()
