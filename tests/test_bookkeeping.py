"""Rank 0's manifest during a dump (kdcache/dump/bookkeeping.py): rewritten rarely enough that its total
cost per shard stays flat, yet complete at the end and never claiming a shard that is not complete."""
from __future__ import annotations

import json
import math

from kdcache.cache.manifest import manifest_path
from kdcache.cache.schema import SHARD_DIR, shard_name, shard_stats_name
from kdcache.cache.shards import complete_shards
from kdcache.dump import bookkeeping
from kdcache.dump.bookkeeping import ManifestKeeper


def base_manifest(num_shards: int) -> dict:
    return {"format_version": 2, "complete": False, "num_shards": num_shards, "shards": [],
            "totals": {"rows": 0, "positions": 0, "bytes": 0}}


def fake_shard(out, index: int) -> dict:
    """A data file and its sidecar, as write_shard leaves them (the size is all completeness checks)."""
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    data = b"x" * (10 + index % 7)
    (out / shard_name(index)).write_bytes(data)
    stats = {"index": index, "file": shard_name(index), "rows": 2, "positions": 3 + index, "bytes": len(data),
             "sha256": f"{index:064x}"}
    (out / shard_stats_name(index)).write_text(json.dumps(stats))
    return stats


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def recorded(out) -> dict:
    return json.loads(manifest_path(out).read_text())


def test_rewrites_grow_with_the_log_of_the_shards_and_the_end_is_complete(tmp_path, monkeypatch):
    n = 3000
    written = []  # shard entries in each rewrite: their sum is the bytes written, up to a constant
    real_write = bookkeeping.write_cache_json
    monkeypatch.setattr(bookkeeping, "write_cache_json",
                        lambda path, m: (written.append(len(m["shards"])), real_write(path, m)))
    keeper = ManifestKeeper(tmp_path, base_manifest(n), {}, clock=Clock())
    for i in range(n):
        keeper.add(fake_shard(tmp_path, i))
        # What the manifest claims is always complete on disk (sidecars are the truth).
        if written and written[-1] == i + 1:
            assert len(recorded(tmp_path)["shards"]) == i + 1
    # Every rewrite waits for max(EVERY, 1/GROWTH of the recorded) new shards: EVERY-spaced up to
    # EVERY*GROWTH, then geometric with ratio 1 + 1/GROWTH.
    e, g = bookkeeping.EVERY, bookkeeping.GROWTH
    bound = g + math.log(n / (e * g)) / math.log(1 + 1 / g) + 2
    assert 0 < len(written) <= bound, written
    assert sum(written) <= (g + 2) * n  # O(1) manifest entries written per shard, not O(shards)
    final = keeper.final()
    assert final["complete"] is True and [s["index"] for s in final["shards"]] == list(range(n))
    listed = complete_shards(tmp_path)
    assert final["shards"] == [listed[i] for i in range(n)]
    assert final["totals"]["positions"] == sum(3 + i for i in range(n))


def test_a_slow_dump_rewrites_after_the_time_limit(tmp_path):
    clock = Clock()
    keeper = ManifestKeeper(tmp_path, base_manifest(10), {}, clock=clock)
    keeper.add(fake_shard(tmp_path, 0))
    assert keeper.rewrites == 0 and not manifest_path(tmp_path).exists()
    clock.now = bookkeeping.SECONDS
    keeper.add(fake_shard(tmp_path, 1))
    assert keeper.rewrites == 1 and [s["index"] for s in recorded(tmp_path)["shards"]] == [0, 1]


def test_other_ranks_shards_are_found_by_listing_and_resumed_shards_are_kept(tmp_path):
    resumed = {i: fake_shard(tmp_path, i) for i in range(3)}
    keeper = ManifestKeeper(tmp_path, base_manifest(200), resumed, world=2, every=4, clock=Clock())
    for i in range(3, 200):
        stats = fake_shard(tmp_path, i)
        if i % 2 == 0:  # rank 0's shards; the odd ones are another rank's, seen only on disk
            keeper.add(stats)
    assert keeper.rewrites > 0
    assert any(s["index"] % 2 for s in recorded(tmp_path)["shards"] if s["index"] > 2)  # listed mid-run
    final = keeper.final()
    assert final["complete"] is True and [s["index"] for s in final["shards"]] == list(range(200))
    # A shard whose data file lost its sidecar is not complete, so it is never recorded.
    (tmp_path / shard_stats_name(150)).unlink()
    keeper = ManifestKeeper(tmp_path, base_manifest(200), {}, world=2, clock=Clock())
    assert 150 not in {s["index"] for s in keeper.final()["shards"]} and not keeper.final()["complete"]


def test_flush_records_the_shards_of_a_stopped_run_and_never_hides_its_error(tmp_path, monkeypatch):
    keeper = ManifestKeeper(tmp_path, base_manifest(100), {}, clock=Clock())
    for i in range(5):
        keeper.add(fake_shard(tmp_path, i))
    assert not manifest_path(tmp_path).exists()  # below every threshold
    keeper.flush()
    assert [s["index"] for s in recorded(tmp_path)["shards"]] == [0, 1, 2, 3, 4]
    keeper.add(fake_shard(tmp_path, 5))

    def disk_full(path, manifest):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bookkeeping, "write_cache_json", disk_full)
    keeper.flush()  # best effort: the run's own error is the one to report
    assert len(recorded(tmp_path)["shards"]) == 5
