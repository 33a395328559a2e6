"""The dump's per-shard bookkeeping (rank 0's manifest updates) at 1k, 10k and 100k tiny shards, on local
disk and in moto's S3 server on 127.0.0.1: seconds per shard, old rule vs new side by side.

Old (before issue 15): after every shard, list data/, read the new sidecars and rewrite the whole manifest
(record.with_shards + write_cache_json): the S-th shard costs O(S), a dump O(S^2).
New (dump/bookkeeping.py): ManifestKeeper.add per shard, the manifest rewritten geometrically rarely,
listing data/ only under torchrun; plus the final manifest, which lists data/ once and reads every sidecar back
(the confirmation that the store kept what was written).

Only the bookkeeping is timed. Each simulated shard's data object and sidecar (a few bytes) are created
first, untimed: on disk directly, in the bucket straight into moto's in-process store (an HTTP PUT to moto
costs ~25 ms, which would make 100k shards take an hour; the sidecar PUT is the same in old and new).
  new, 1 process: every add() and the final manifest, divided by S (a whole run: amortised cost).
  new, 2 ranks:   as above with world=2: half the shards come from "another rank" and are found by the
                  listing each rewrite makes (local disk only by default: moto lists ~5k objects/s).
  old:            the S-th shard's cost (median of 3 calls with S shards on disk; 1 call at 100k; not in
                  the bucket at 100k: one LIST of 200k objects from moto times out after 3 s per page); a run of S shards
                  costs about half of it per shard (cost is linear in the shard's index). At 1k on local
                  disk a whole old run is also timed, as a check of that.

    nice python benchmarks/bookkeeping.py [--scales 1000 10000 100000] [--no-s3] [--s3-ranks]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from train_common import command_line


def shard_files(index: int) -> tuple[bytes, dict]:
    from kdcache.cache.schema import shard_name
    data = b"x" * (16 + index % 5)
    return data, {"index": index, "file": shard_name(index), "rows": 4096, "positions": 4096 * 2047,
                  "bytes": len(data), "sha256": f"{index:064x}"}


class LocalStore:
    name = "local disk"

    def __init__(self, root: Path):
        self.root = root

    def out(self, label: str):
        path = self.root / label
        (path / "data").mkdir(parents=True)
        return path

    def put(self, out, index: int) -> dict:
        from kdcache.cache.schema import shard_stats_name
        data, stats = shard_files(index)
        (out / stats["file"]).write_bytes(data)
        (out / shard_stats_name(index)).write_text(json.dumps(stats))
        return stats


class MotoStore:
    name = "S3 (moto, 127.0.0.1)"
    bucket = "bench"

    def __init__(self):
        import pyarrow.fs as pafs
        from bucket_loader import start_s3_server
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        self.server, endpoint = start_s3_server(0)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(self.bucket)
        self.backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]  # the server runs in this process

    def out(self, label: str):
        from kdcache.cache.storage import location
        self.prefix = label
        return location(f"s3://{self.bucket}/{label}")

    def put(self, out, index: int) -> dict:
        from kdcache.cache.schema import shard_stats_name
        data, stats = shard_files(index)
        self.backend.put_object(self.bucket, f"{self.prefix}/{stats['file']}", data)
        self.backend.put_object(self.bucket, f"{self.prefix}/{shard_stats_name(index)}", json.dumps(stats).encode())
        return stats


def manifest_for(num_shards: int) -> dict:
    return {"format_version": 2, "task": "clm", "complete": False, "num_shards": num_shards, "shards": [],
            "totals": {"rows": 0, "positions": 0, "bytes": 0}, "dump": {}}


def new_run(store, label: str, scale: int, world: int) -> tuple[float, int]:
    """(bookkeeping seconds per shard over a whole run, manifest rewrites)."""
    from kdcache.cache.manifest import manifest_path, write_cache_json
    from kdcache.dump.bookkeeping import ManifestKeeper
    out = store.out(label)
    keeper = ManifestKeeper(out, manifest_for(scale), {}, world=world)
    seconds = 0.0
    for index in range(scale):
        stats = store.put(out, index)
        if index % world == 0:
            start = time.perf_counter()
            keeper.add(stats)
            seconds += time.perf_counter() - start
    start = time.perf_counter()
    final = keeper.final()
    write_cache_json(manifest_path(out), final)
    seconds += time.perf_counter() - start
    assert final["complete"] and len(final["shards"]) == scale
    return seconds / scale, keeper.rewrites + 1


def old_marginal(out, scale: int, repeats: int = 3) -> float:
    """Seconds the old rule spends after the S-th shard (S shards on disk, S-1 already known)."""
    from kdcache.cache.manifest import manifest_path, write_cache_json
    from kdcache.cache.shards import complete_shards
    from kdcache.dump.record import with_shards
    manifest, everything = manifest_for(scale), complete_shards(out)
    times = []
    for _ in range(repeats):
        known = {i: s for i, s in everything.items() if i != scale - 1}
        start = time.perf_counter()
        write_cache_json(manifest_path(out), with_shards(manifest, out, known))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_run(store, label: str, scale: int) -> float:
    """A whole run under the old rule: seconds per shard."""
    from kdcache.cache.manifest import manifest_path, write_cache_json
    from kdcache.dump.record import with_shards
    out, manifest, known = store.out(label), manifest_for(scale), {}
    seconds = 0.0
    for index in range(scale):
        store.put(out, index)
        start = time.perf_counter()
        write_cache_json(manifest_path(out), with_shards(manifest, out, known))
        seconds += time.perf_counter() - start
    return seconds / scale


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--s3-ranks", action="store_true", help="also the 2-rank (listing) run in the bucket")
    ap.add_argument("--old-s3-max", type=int, default=10000,
                    help="largest scale to time the old rule in the bucket (moto's LIST of 200k objects times out)")
    args = ap.parse_args()
    stores = [LocalStore(Path(tempfile.mkdtemp(prefix="kdcache-bookkeeping-")))]
    if not args.no_s3:
        stores.append(MotoStore())
    print(f"# {command_line()}")
    print("| store | shards | new, 1 process: ms/shard (rewrites) | new, 2 ranks: ms/shard (rewrites) "
          "| old: ms for the S-th shard | old: ms/shard over a whole run | old S-th / new 1 process |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for store in stores:
        for scale in args.scales:
            one, rewrites = new_run(store, f"new1-{scale}", scale, world=1)
            two = None
            if isinstance(store, LocalStore) or args.s3_ranks:
                two, rewrites2 = new_run(store, f"new2-{scale}", scale, world=2)
            marginal = None
            if isinstance(store, LocalStore) or scale <= args.old_s3_max:
                marginal = old_marginal(store.out(f"new1-{scale}") if isinstance(store, MotoStore)
                                        else store.root / f"new1-{scale}", scale, repeats=3 if scale <= 10000 else 1)
            whole = old_run(store, f"old-{scale}", scale) if isinstance(store, LocalStore) and scale <= 1000 else None
            two_text = "-" if two is None else f"{ms(two)} ({rewrites2})"
            ratio = "-" if marginal is None else f"{marginal / one:,.0f}x"
            print(f"| {store.name} | {scale:,} | {ms(one)} ({rewrites}) | {two_text} | {ms(marginal)} | {ms(whole)} "
                  f"| {ratio} |", flush=True)
    if not args.no_s3:
        stores[-1].server.stop()


if __name__ == "__main__":
    main()
