"""The cache stream: partitioning, deterministic shuffle, exact mid-epoch restore, collation."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from kdcache.cache.stream import CacheStream, StreamLoader, open_cache
from kdcache.errors import KdcacheError
from stage2_helpers import synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 301 rows in 4 shards of <= 100 rows, row groups of 13: ragged everywhere on purpose.
    return synthetic_cache(tmp_path_factory.mktemp("stream") / "cache", num_rows=301)


def epoch_ids(cache, *, rank=0, world=1, workers=0, epoch=0, seed=0, batch_size=8, shuffle_buffer=40):
    stream = CacheStream(cache, batch_size=batch_size, seed=seed, rank=rank, world_size=world,
                         num_workers=workers, shuffle_buffer=shuffle_buffer)
    loader = StreamLoader(stream)
    loader.epoch = epoch
    return [b["example_id"].tolist() for b in loader]


def flat(batches):
    return [i for b in batches for i in b]


def test_every_row_once_across_ranks_and_workers(cache):
    per_rank = [epoch_ids(cache, rank=r, world=2, workers=2) for r in range(2)]
    ids = flat(per_rank[0]) + flat(per_rank[1])
    assert sorted(ids) == list(range(1000, 1301))
    # Ranks get the same number of rows (±1) and of batches, full ones except the last.
    assert abs(len(flat(per_rank[0])) - len(flat(per_rank[1]))) <= 1
    for batches in per_rank:
        assert sum(len(b) < 8 for b in batches) <= 1 and min(map(len, batches)) >= 1
    # The stream's own arithmetic agrees with what was delivered: ceil(301 / 16) steps on each rank.
    stream = CacheStream(cache, batch_size=8, world_size=2, num_workers=2)
    assert stream.batches_per_epoch() == len(per_rank[0]) == len(per_rank[1]) == 19


def test_same_seed_same_order_other_epoch_or_seed_differs(cache):
    a = flat(epoch_ids(cache, workers=2, epoch=0))
    assert a == flat(epoch_ids(cache, workers=2, epoch=0))
    b = flat(epoch_ids(cache, workers=2, epoch=1))
    c = flat(epoch_ids(cache, workers=2, epoch=0, seed=1))
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1000, 1301))
    assert a != b and a != c
    # Shuffled at both levels: not the file order, and not merely row groups reordered.
    assert a != sorted(a)
    runs = sum(1 for x, y in zip(a, a[1:]) if y == x + 1)
    assert runs < 100


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_restore_continues_at_next_sample(cache, workers):
    full = StreamLoader(CacheStream(cache, batch_size=8, seed=3, world_size=2, rank=1, num_workers=workers))
    full.epoch = 2
    all_batches = [b["example_id"].tolist() for b in full]
    for cut in (1, 5, len(all_batches) - 1):
        first = StreamLoader(CacheStream(cache, batch_size=8, seed=3, world_size=2, rank=1, num_workers=workers))
        first.epoch = 2
        seen = []
        for batch in first:
            seen.append(batch["example_id"].tolist())
            if len(seen) == cut:
                break
        state = first.state_dict()
        assert state["epoch"] == 2 and state["batches"] == cut
        resumed = StreamLoader(CacheStream(cache, batch_size=8, seed=3, world_size=2, rank=1, num_workers=workers))
        resumed.load_state_dict(state)
        rest = [b["example_id"].tolist() for b in resumed]
        assert seen + rest == all_batches


def test_restore_refuses_a_different_order_or_global_batch(cache):
    state = StreamLoader(CacheStream(cache, batch_size=8, num_workers=2)).state_dict()
    with pytest.raises(KdcacheError, match="global batch"):
        StreamLoader(CacheStream(cache, batch_size=4, num_workers=2)).load_state_dict(state)
    with pytest.raises(KdcacheError, match="seed"):
        StreamLoader(CacheStream(cache, batch_size=8, num_workers=2, seed=1)).load_state_dict(state)
    with pytest.raises(KdcacheError, match="shuffle buffer"):
        StreamLoader(CacheStream(cache, batch_size=8, num_workers=2, shuffle_buffer=7)).load_state_dict(state)


def loaders(cache, *, world, workers, batch_size, grad_accum=1, seed=4):
    return [StreamLoader(CacheStream(cache, batch_size=batch_size, grad_accum=grad_accum, seed=seed, rank=r,
                                     world_size=world, num_workers=workers, shuffle_buffer=40)) for r in range(world)]


def read_steps(group, steps, grad_accum):
    """Every rank takes `steps` x grad_accum micro-batches (in lockstep, as training does); the example ids."""
    ids = []
    for loader in group:
        taken = 0
        for batch in loader if steps else ():
            assert 1 <= batch["num_rows"] <= loader.stream.batch_size
            ids += batch["example_id"].tolist()
            taken += 1
            if taken == steps * grad_accum:
                break
        assert taken == steps * grad_accum
    states = [loader.state_dict() for loader in group]
    assert all(state == states[0] for state in states)  # the position is the same on every rank
    return ids, states[0]


def test_resized_resume_reads_every_row_once(cache):
    # 2 ranks x 2 workers (micro-batch 8) -> 1 rank x 3 workers (8 x 2 accumulation) -> back to 2 x 2
    # (4 x 2 accumulation): 16 rows per step throughout, real DataLoader worker processes.
    first = loaders(cache, world=2, workers=2, batch_size=8)
    steps = first[0].stream.steps_per_epoch()
    ids, state = read_steps(first, 5, 1)
    middle = loaders(cache, world=1, workers=3, batch_size=8, grad_accum=2)
    middle[0].load_state_dict(state)
    more, state = read_steps(middle, 6, 2)
    last = loaders(cache, world=2, workers=2, batch_size=4, grad_accum=2)
    for loader in last:
        loader.load_state_dict(state)
    rest = [i for loader in last for b in loader for i in b["example_id"].tolist()]
    assert sorted(ids + more + rest) == list(range(1000, 1301))
    assert len(rest) == 301 - 11 * 16 and all(lo.batches == (steps - 11) * 2 for lo in last)
    # The next epoch starts whole under the new geometry, in the epoch's own order.
    for loader in last:
        loader.next_epoch()
    again = [i for loader in last for b in loader for i in b["example_id"].tolist()]
    assert sorted(again) == list(range(1000, 1301))


def test_same_geometry_resume_repeats_the_uninterrupted_order(cache):
    straight, _ = read_steps(loaders(cache, world=1, workers=3, batch_size=8, grad_accum=2), 10, 2)
    group = loaders(cache, world=1, workers=3, batch_size=8, grad_accum=2)
    head, state = read_steps(group, 4, 2)
    group = loaders(cache, world=1, workers=3, batch_size=8, grad_accum=2)
    group[0].load_state_dict(state)
    tail, _ = read_steps(group, 6, 2)
    assert head + tail == straight


def test_collated_batch_matches_the_rows(cache):
    table = pq.read_table(cache / "data")
    rows = {r["example_id"]: r for r in table.to_pylist()}
    stream = CacheStream(cache, batch_size=16, shuffle_buffer=50)
    batch = next(iter(stream))
    # Narrow, as cached: the loss widens them on its device.
    assert batch["target_logprobs"].dtype == torch.float16 and batch["target_ids"].dtype == torch.int32
    assert batch["target_ids"].shape[1] == 4
    target = 0
    for b, example in enumerate(batch["example_id"].tolist()):
        row = rows[example]
        n = len(row["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert batch["attention_mask"][b].sum() == n and batch["input_ids"][b, n:].eq(0).all()
        for j, pos in enumerate(row["positions"]):
            assert batch["target_rows"][target] == b and batch["target_positions"][target] == pos
            assert batch["target_ids"][target].tolist() == row["topk_ids"][j]
            torch.testing.assert_close(batch["target_logprobs"][target],
                                       torch.tensor(row["topk_logprobs"][j], dtype=torch.float16))
            assert batch["labels"][target] == row["labels"][j]
            target += 1
    assert target == len(batch["labels"])
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())


def test_open_files_do_not_grow_with_the_shard_count(tmp_path):
    # Each open ParquetFile keeps its read buffers, so one handle per shard would make memory
    # grow with the cache. Shuffled row groups hop between shards; reading must still be complete.
    from kdcache.cache import stream as stream_module
    cache = synthetic_cache(tmp_path / "many", num_rows=240, shard_rows=20, row_group_rows=5)
    s = CacheStream(cache, batch_size=8, shuffle_buffer=30)
    ids, most_open = [], 0
    for batch in s:
        ids += batch["example_id"].tolist()
        most_open = max(most_open, len(s._files))
    assert sorted(ids) == sorted(pq.read_table(cache / "data").column("example_id").to_pylist())
    assert len(open_cache(cache).shard_paths) == 12 and most_open <= stream_module.OPEN_SHARDS


def test_hard_label_stream_does_not_decode_soft_targets(cache):
    batch = next(iter(CacheStream(cache, batch_size=4, soft_targets=False)))
    assert "target_ids" not in batch and "target_logprobs" not in batch and len(batch["labels"]) > 0


def test_missing_and_corrupt_shards_are_named(tmp_path):
    cache = synthetic_cache(tmp_path / "c1", num_rows=120, shard_rows=50)
    shard = cache / "data" / "part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, broken footer magic
    with pytest.raises(KdcacheError, match="part-00001.parquet .* corrupt"):
        open_cache(cache)
    shard.write_bytes(data[:100])
    with pytest.raises(KdcacheError, match=r"part-00001.parquet .* corrupt: 100 bytes"):
        open_cache(cache)
    shard.unlink()
    with pytest.raises(KdcacheError, match="part-00001.parquet of cache .* is missing"):
        open_cache(cache)
