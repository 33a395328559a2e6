"""Peak memory of `kdcache train-student` over one full epoch of a cache at 1x and 10x size.
Goal: peak(10x) / peak(1x) <= 1.1 (memory bounded by row groups + shuffle window, not the cache).

Each run is a fresh `python -m kdcache train-student` process (1 loader worker); its process
tree's memory (PSS, so pages the forked worker shares with its parent count once) is sampled
every 50 ms with psutil. A cache smaller than the shuffle buffer never fills it, so compare
caches that are both larger than --shuffle-buffer to see the steady state.

    python benchmarks/train_memory.py [--rows 800] [--scale 10]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from train_common import REPO, command_line, synthetic_cache


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(peak PSS of the process tree, peak PSS of the main process, seconds), in MiB."""
    # stderr to a file, not a pipe: nobody reads a pipe while we sample, and a long run's
    # output would fill it and block the child.
    err_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err_file)
    main = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            procs = [main] + main.children(recursive=True)
            # PSS: pages shared by the forked worker and its parent are counted once in the sum.
            rss = [p.memory_full_info().pss for p in procs]
            peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.05)
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return peak_tree / 2**20, peak_main / 2**20, time.perf_counter() - start


_STEP_SNIPPET = r"""
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from kdcache.train.losses import DistillLoss
from kdcache.train.loop import StudentLoss
vocab, batch, length, k, chunk = map(int, sys.argv[1:6])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True))
n = batch * length
data = {"input_ids": torch.randint(0, vocab, (batch, length)), "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "target_rows": torch.arange(batch).repeat_interleave(length), "target_positions": torch.arange(length).repeat(batch),
        "labels": torch.randint(0, vocab, (n,)), "target_ids": torch.randint(0, vocab, (n, k)),
        "target_logprobs": -torch.rand(n, k).sort(-1).values * 10}
net = StudentLoss(model, "clm", DistillLoss(alpha=0.5, chunk_elements=chunk))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net(data)[0].backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def step_peak_mib(vocab: int, batch: int, length: int, k: int, chunk_elements: int, env: dict) -> float:
    """Growth of peak RSS (MiB) over one CLM forward+backward of a L2-H128 student, fresh process."""
    out = subprocess.run([sys.executable, "-c", _STEP_SNIPPET, *map(str, (vocab, batch, length, k, chunk_elements))],
                         env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shuffle-buffer", type=int, default=2048)
    ap.add_argument("--skip-logits", action="store_true", help="skip the output-layer memory table")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache_memory_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"# {command_line()}")
    results = {}
    for factor in (1, args.scale):
        rows = args.rows * factor
        cache = synthetic_cache(work / f"cache_x{factor}", rows=rows, length=args.length, k=args.k,
                                vocab_size=args.vocab, task="clm", shard_rows=1024)
        out = work / f"student_x{factor}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "kdcache", "train-student", "--cache", str(cache), "--student", "L2-H128",
               "--out", str(out), "--epochs", "1", "--batch-size", str(args.batch_size), "--num-workers", "1",
               "--device", "cpu", "--shuffle-buffer", str(args.shuffle_buffer), "--no-progress"]
        size = sum(p.stat().st_size for p in (cache / "data").glob("*.parquet")) / 2**20
        tree, main_only, seconds = peak_rss(cmd, env)
        results[factor] = tree
        print(f"x{factor}: {rows:,} rows, {size:,.1f} MiB of shards, shuffle buffer {args.shuffle_buffer}: "
              f"peak PSS {tree:,.0f} MiB (main process "
              f"{main_only:,.0f} MiB) in {seconds:.0f} s", flush=True)
    print(f"\n| cache (shuffle buffer {args.shuffle_buffer} rows) | peak PSS (main + worker) | ratio (goal ≤ 1.1) |\n|---|---:|---:|")
    for factor, tree in results.items():
        print(f"| {factor}× ({args.rows * factor:,} rows) | {tree:,.0f} MiB | {tree / results[1]:.3f} |")

    if args.skip_logits:
        return
    # The CLM output layer: chunked + checkpointed vs (batch x length x vocab) logits all at once.
    vocab, batch, length = 32000, 16, 256
    full = step_peak_mib(vocab, batch, length, args.k, 1 << 62, env)
    chunked = step_peak_mib(vocab, batch, length, args.k, 1 << 24, env)
    print(f"\nCLM step memory, L2-H128 student, vocab {vocab}, batch {batch} x {length} tokens "
          f"({batch * length * vocab * 4 / 2**20:,.0f} MiB of fp32 logits if materialised):")
    print("| output layer | peak RSS growth over one forward+backward |\n|---|---:|")
    print(f"| all targets at once | {full:,.0f} MiB |\n| chunks of 16M logits, checkpointed (default) | {chunked:,.0f} MiB |")


if __name__ == "__main__":
    main()
