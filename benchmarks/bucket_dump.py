"""Writing shards into a bucket vs onto local disk, side by side in one run: positions per second the
dump's ShardWriter sustains (Arrow build + Parquet/zstd + sha256, then fsync+rename locally, or one
whole-object upload and a sidecar object to the bucket).

The bucket is moto's S3 server on 127.0.0.1 (a Python process): it measures what going through
pyarrow's S3 filesystem costs kdcache's writer, not S3's own throughput. --latency-ms puts
bucket_loader.py's proxy in front, which delays every 64 KiB chunk, not each request: a shard of
~10 MB then waits seconds, so it is off by default (a real store's round trip is paid once per part). Synthetic CLM rows as in dump_writer.py (k = 64, 512 positions per row). The
writer runs in the background of the teacher, so the figure that matters is whether the bucket
writer stays above the teacher's rate. Runs alternate so all see the same machine.

    python benchmarks/bucket_dump.py [--shards 3] [--rows 128] [--repeats 3] [--latency-ms 0]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import pyarrow.fs as pafs

from bucket_loader import start_s3_server
from dump_writer import synthetic_shard
from train_common import command_line, print_ratio_table


def positions_per_second(out, shard, shards: int, schema, k: int) -> float:
    from kdcache.dump.writer import ShardWriter
    writer = ShardWriter(out, schema, k, threads=1)
    start = time.perf_counter()
    for index in range(shards):
        writer.submit(index, shard)
    writer.close()
    return sum(len(r[0].positions) for r in shard) * shards / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--rows", type=int, default=128, help="rows of 512 positions per shard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to each 64 KiB chunk (0: none)")
    args = ap.parse_args()
    from kdcache.cache.schema import arrow_schema

    server, endpoint = start_s3_server(args.latency_ms)
    try:
        k, length, vocab = 64, 512, 49152
        schema = arrow_schema(k=k, vocab_size=vocab, max_length=length)
        shard = synthetic_shard(args.rows, length, k, vocab)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
        print(f"# {command_line()}")
        rates = {"local disk": [], "bucket": []}
        for run in range(args.repeats):
            rates["local disk"].append(positions_per_second(tempfile.mkdtemp(), shard, args.shards, schema, k))
            rates["bucket"].append(positions_per_second(f"s3://bench/run{run}", shard, args.shards, schema, k))
        print(f"| destination (bucket: moto on 127.0.0.1, +{args.latency_ms:g} ms per request) | writer positions/s "
              f"(1 thread, k = {k}, {args.shards} shards x {args.rows * length:,} positions, median of "
              f"{args.repeats}) | vs local |")
        print_ratio_table(rates, "local disk")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
