"""The device step of stage one per target kind: top-k vs sampling, time per target position.

`TeacherRunner.device_targets` on logits shaped like a real batch (one row of --positions targets over a
--vocab vocabulary, Zipf-shaped so sampling sees an LM-like distribution), on --device (cpu, or cuda where
there is one), median of --repeats interleaved rounds; ratios to top-64 side by side. Next to it, the
teacher forward this step follows: for SmolLM2-135M about 2 × 135M FLOPs per token, so on any device the
step is a small part of a dump unless it is far slower than top-k.

    python benchmarks/dump_targets_step.py [--device cuda] [--positions 8192] [--vocab 49152]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdcache.dump.run import TeacherRunner

KINDS = {"top-64": ("top-k", 64, 0), "sample N=16": ("sample", 0, 16), "sample N=32": ("sample", 0, 32),
         "top-8 + sample N=16": ("top-k+sample", 8, 16)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, args.vocab + 1, dtype=torch.float32).log()
    logits = -(1.0 + torch.rand(args.positions, 1, generator=g)) * ranks
    logits = logits.gather(1, torch.rand(args.positions, args.vocab, generator=g).argsort(1))  # shuffled ids
    logits = logits[None].to(device, dtype)
    b = torch.zeros(args.positions, dtype=torch.long, device=device)
    p = torch.arange(args.positions, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runners = {}
    for name, (kind, k, samples) in KINDS.items():
        runner = TeacherRunner.__new__(TeacherRunner)
        runner.kind, runner.k, runner.samples, runner.seed = kind, k, samples, 0
        runners[name] = runner
    times = {name: [] for name in KINDS}
    for rep in range(args.repeats + 1):  # the first round warms up (allocator, kernels)
        for name, runner in runners.items():
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                out = runner.device_targets(logits, b, p, p)
            sync()
            if rep:
                times[name].append(time.perf_counter() - start)
            del out
    print(f"# {args.positions:,} target positions x vocab {args.vocab:,}, {args.dtype} logits on {device}; "
          f"median of {args.repeats}")
    print("| target kind | µs per position | ÷ top-64 |")
    print("|---|---:|---:|")
    base = statistics.median(times["top-64"])
    for name in KINDS:
        t = statistics.median(times[name])
        print(f"| {name} | {t / args.positions * 1e6:,.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
