"""Loader alone: target positions decoded per second by ONE worker (Parquet read + zstd +
Arrow -> padded tensors + (N, k) top-k ids/log-probs), at k = 64. Goal: >= 500k/s/worker.

The stream runs in this process (num_workers=0 is exactly what one DataLoader worker does),
with one intra-op thread, over a synthetic cache written by the real shard writer.

    python benchmarks/train_loader.py [--rows 4000] [--k 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_common import Timer, command_line, synthetic_cache


def positions_per_second(cache: Path, *, batch_size: int, soft: bool = True) -> tuple[float, float]:
    """(positions per wall-clock second, positions per CPU second of this process, all threads).
    On a shared machine the CPU-second rate is what one worker with a core to itself achieves."""
    from kdcache.cache.stream import CacheStream
    stream = CacheStream(cache, batch_size=batch_size, seed=0, soft_targets=soft)
    n = 0
    cpu = time.process_time()
    with Timer() as t:
        for batch in stream:
            n += len(batch["labels"])
    return n / t.seconds, n / (time.process_time() - cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache_loader_"))
    print(f"# {command_line()}")
    print("| cache | rows | positions/row | k | positions/s per worker, wall clock | per CPU-second | goal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for task in ("clm", "mlm"):
        cache = synthetic_cache(work / f"{task}_{args.rows}_{args.k}", rows=args.rows, length=args.length, k=args.k,
                                vocab_size=args.vocab, task=task)
        rates = [positions_per_second(cache, batch_size=args.batch_size) for _ in range(args.repeats)]
        per_row = args.length if task == "clm" else round(0.15 * args.length)
        wall, cpu = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
        print(f"| synthetic {task} (L={args.length}, V={args.vocab}) | {args.rows:,} | {per_row} | {args.k} | "
              f"{wall:,.0f} | {cpu:,.0f} | >= 500,000 |")
    rates = [positions_per_second(cache, batch_size=args.batch_size, soft=False) for _ in range(args.repeats)]
    print(f"\nhard labels only (alpha 0: top-k columns not read), mlm cache: "
          f"{statistics.median(r[0] for r in rates):,.0f} positions/s wall, "
          f"{statistics.median(r[1] for r in rates):,.0f} per CPU-second (medians of {args.repeats})")

if __name__ == "__main__":
    main()
