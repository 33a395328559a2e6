"""Shard-writer throughput (Arrow build + Parquet/zstd + fsync + sha256) for one and several threads.

On a GPU the teacher outruns the host; this measures the host's ceiling for writing top-k rows.
Synthetic CLM rows (every position a target), k = 64, vocab 49,152, 490 rows × 512 tokens per shard.

    python benchmarks/dump_writer.py [--shards 4] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from kdcache.cache.schema import arrow_schema
from kdcache.dump.writer import ShardWriter


def synthetic_shard(rows: int, length: int, k: int, vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        row = SimpleNamespace(example_id=i, input_ids=rng.integers(0, vocab, length), positions=np.arange(length),
                              labels=rng.integers(0, vocab, length).astype(np.int32), token_type_ids=None)
        # ids spread over a few thousand tokens and decaying log-probs, like a real teacher's top-k
        ids = (np.argsort(rng.random((length, 200)), 1)[:, :k] * 200).astype(np.int32)
        logprobs = np.sort(-rng.exponential(3.0, (length, k)), 1)[:, ::-1].astype(np.float16)
        out.append((row, ids, logprobs))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    k, length, rows, vocab = 64, 512, 490, 49152
    schema = arrow_schema(k=k, vocab_size=vocab, max_length=length)
    shard = synthetic_shard(rows, length, k, vocab)
    positions = rows * length * args.shards
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every setting
        for threads in args.threads:
            writer = ShardWriter(tempfile.mkdtemp(), schema, k, threads=threads)
            start = time.perf_counter()
            for index in range(args.shards):
                writer.submit(index, shard)
            writer.close()
            seconds = time.perf_counter() - start
            print(f"threads={threads}: {args.shards} shards, {positions:,} positions in {seconds:.2f}s "
                  f"-> {positions / seconds:,.0f} positions/s")


if __name__ == "__main__":
    main()
