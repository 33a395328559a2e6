"""Both stages on one process vs two torchrun agents standing in for two nodes (c10d rendezvous on
127.0.0.1, CPU, gloo), side by side in one run, alternating the order each round.

    python3 benchmarks/multinode.py [--lines 2000] [--rounds 2] [--procs-per-node 1]

Prints wall time per layout and the ratio to one process. On a 2-core box, 2 nodes x 1 process
each get one core, as one process gets two threads: the ratio measures what the rendezvous, the
rank sharding, the gloo barriers and DDP's all-reduce cost, not a speed-up the box cannot give.
The caches are checked to be row-identical, so the timing is of the same work.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from dump_common import SHAKESPEARE, bert_mlm_teacher
from train_common import command_line

DUMP = ["--max-length", "128", "--targets", "top-k", "--top-k", "16", "--shard-rows", "64", "--no-progress"]
TRAIN = ["--student", "L2-H128", "--epochs", "1", "--batch-size", "8", "--num-workers", "1", "--device", "cpu",
         "--no-progress", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], *, nnodes: int, procs: int, threads: int) -> float:
    """Wall seconds of `kdcache ARGS` as `nnodes` torchrun agents of `procs` processes (1x1: plain)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if nnodes == 1 and procs == 1:
        cmds = [[sys.executable, "-m", "kdcache", *args]]
    else:
        endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                 "--nproc-per-node", str(procs), "-m", "kdcache", *args] for node in range(nnodes)]
    start = time.perf_counter()
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    for proc in running:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmds[0][:8])} ... failed:\n{err[-2000:]}")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=2000, help="Tiny Shakespeare lines in the corpus")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--procs-per-node", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcache_multinode_"))
    teacher = bert_mlm_teacher(work / "teacher", size="base")
    corpus = work / "lines.txt"
    corpus.write_text("\n".join([line for line in SHAKESPEARE.read_text().splitlines() if line.strip()][:args.lines]) + "\n")
    cores = os.cpu_count() or 2
    layouts = {"1 process": (1, 1, cores), f"2 nodes x {args.procs_per_node}": (2, args.procs_per_node, 1)}
    times = {stage: {name: [] for name in layouts} for stage in ("dump", "train")}
    reference = None
    for r in range(args.rounds):
        for name in (list(layouts) if r % 2 == 0 else list(reversed(layouts))):
            nnodes, procs, threads = layouts[name]
            cache, student = work / f"cache-{r}-{nnodes}", work / f"student-{r}-{nnodes}"
            times["dump"][name].append(launch(["dump-logits", "--teacher", str(teacher), "--data", str(corpus),
                                               "--out", str(cache), *DUMP], nnodes=nnodes, procs=procs, threads=threads))
            rows = pq.read_table(cache / "data").sort_by("example_id")
            if reference is None:
                reference = rows
            assert rows.equals(reference), f"{name}: the cache differs from the first one"
            times["train"][name].append(launch(["train-student", "--cache", str(cache), "--out", str(student), *TRAIN],
                                               nnodes=nnodes, procs=procs, threads=threads))
    print(command_line())
    print(f"corpus {args.lines} lines, {reference.num_rows} rows; BERT-base-shaped teacher; {cores} cores; medians of {args.rounds}")
    print("| stage | layout | wall s (median) | ÷ 1 process |")
    print("|---|---|---:|---:|")
    for stage, by_layout in times.items():
        base = statistics.median(by_layout["1 process"])
        for name, seconds in by_layout.items():
            print(f"| {stage} | {name} | {statistics.median(seconds):.1f} | {statistics.median(seconds) / base:.2f} |")


if __name__ == "__main__":
    main()
