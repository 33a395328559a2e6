"""Training speed, side by side in one run, same student, same batches (same seed):

  hard    the student on hard labels only (alpha 0: the cache's soft targets are not read)
  cached  cached KD (alpha 0.5, top-k from the cache)
  online  online KD (alpha 0.5, a live teacher forward per batch, full softmax)
  teacher the teacher's no-grad forward alone over the same batches

Reported: cached ÷ hard step time (goal <= 1.10) and the speed-up of cached over online next to
the ideal (t_teacher + t_student) ÷ t_student (goal >= 0.9 x ideal), with t_student = the hard step.
"loop" rates come from the training loop's own metrics.jsonl windows (the first window, with
worker start-up, is dropped), with the loader worker sharing the machine's cores; "compute only"
times the same student's steps over pre-decoded batches in one process. Modes alternate so
machine load hits them alike.

    python benchmarks/train_speed.py [--tasks mlm clm] [--steps 40] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from train_common import Timer, command_line, dump, make_teacher


def loop_rate(cache: Path, out: Path, *, steps: int, batch_size: int, log_every: int, **mode) -> float:
    """Tokens per second of the real training loop, median over its metrics windows after the first."""
    from kdcache.train.loop import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    train(TrainConfig(cache=cache, student="L2-H128", out=out, max_steps=steps, batch_size=batch_size,
                      num_workers=1, log_every=log_every, progress=False, warmup_steps=0, **mode))
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return statistics.median(w["tokens_per_second"] for w in windows)


@torch.no_grad()
def teacher_rate(cache: Path, teacher: Path, task: str, *, batches: int, batch_size: int) -> float:
    """Tokens per second of the teacher's forward (logits at the targets) over the first batches."""
    from kdcache.cache.stream import CacheStream
    from kdcache.train.forward import target_logits
    from kdcache.train.students import auto_class

    model = auto_class(task).from_pretrained(teacher).eval()
    stream = CacheStream(cache, batch_size=batch_size, seed=0, soft_targets=False)
    data = [b for _, b in zip(range(batches), stream)]
    target_logits(model, task, data[0])  # warm-up
    with Timer() as t:
        for batch in data:
            target_logits(model, task, batch)
    return sum(b["num_tokens"] for b in data) / t.seconds


def compute_step_ratio(cache: Path, task: str, *, batch_size: int, batches: int, repeats: int) -> tuple[float, float]:
    """(hard, cached) seconds per step of the same student over the same pre-decoded batches, in
    this process: the loss computation alone, without the loader competing for the cores."""
    from kdcache.cache.stream import CacheStream, open_cache
    from kdcache.train.losses import DistillLoss
    from kdcache.train.loop import StudentLoss
    from kdcache.train.students import build_student, plan_student

    opened = open_cache(cache)
    data = [b for _, b in zip(range(batches), CacheStream(opened, batch_size=batch_size, seed=0))]
    times = {"hard": [], "cached": []}
    for _ in range(repeats):
        for name, alpha in (("hard", 0.0), ("cached", 0.5)):
            torch.manual_seed(0)
            model = build_student(plan_student("L2-H128", opened.manifest, cache_tokenizer_dir=opened.tokenizer_dir), task)
            net = StudentLoss(model, task, DistillLoss(alpha=alpha))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            step = lambda batch: (net(batch)[0].backward(), optimizer.step(), optimizer.zero_grad())
            step(data[0])  # warm-up
            with Timer() as t:
                for batch in data[1:]:
                    step(batch)
            times[name].append(t.seconds / (len(data) - 1))
    return statistics.median(times["hard"]), statistics.median(times["cached"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mlm", "clm"])
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=6000, help="corpus lines dumped")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache_speed_"))
    print(f"# {command_line()}")
    print(f"# CPU, torch threads {args.threads}, 1 loader worker; teacher L{args.teacher_layers}-H{args.teacher_hidden} "
          f"(random init), student L2-H128, vocab {args.vocab}, k {args.k}, length {args.max_length}, "
          f"batch {args.batch_size}, {args.steps} steps x {args.repeats} alternating repeats per mode")
    rows = []
    for task in args.tasks:
        teacher = make_teacher(task, work / f"{task}_teacher", vocab_size=args.vocab, layers=args.teacher_layers,
                               hidden=args.teacher_hidden)
        cache = dump(teacher, work / f"{task}_cache", k=args.k, max_length=args.max_length, limit=args.limit)
        modes = {"hard": {"alpha": 0.0}, "cached": {"alpha": 0.5}, "online": {"alpha": 0.5, "online_teacher": teacher}}
        rates = {m: [] for m in modes}
        for _ in range(args.repeats):
            for name, mode in modes.items():
                rates[name].append(loop_rate(cache, work / f"{task}_{name}", steps=args.steps,
                                             batch_size=args.batch_size, log_every=5, **mode))
        rates = {m: statistics.median(r) for m, r in rates.items()}
        rates["teacher"] = teacher_rate(cache, teacher, task, batches=20, batch_size=args.batch_size)
        hard_step, cached_step = compute_step_ratio(cache, task, batch_size=args.batch_size, batches=16,
                                                    repeats=args.repeats + 1)
        t = {m: 1 / r for m, r in rates.items()}  # seconds per token
        ideal = (t["teacher"] + t["hard"]) / t["hard"]
        speedup = t["online"] / t["cached"]
        rows.append((task, rates, t["cached"] / t["hard"], speedup, ideal, cached_step / hard_step))
        print(f"{task}: tokens/s " + ", ".join(f"{m} {r:,.0f}" for m, r in rates.items()), flush=True)
    print("\n| task | hard tok/s | cached-KD tok/s | online-KD tok/s | teacher fwd tok/s | cached ÷ hard, loop "
          "(goal ≤ 1.10) | cached ÷ hard, compute only | online ÷ cached (speed-up) | ideal (t_T+t_S)/t_S | "
          "speed-up ÷ ideal (goal ≥ 0.9) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task, r, overhead, speedup, ideal, compute in rows:
        print(f"| {task} | {r['hard']:,.0f} | {r['cached']:,.0f} | {r['online']:,.0f} | {r['teacher']:,.0f} | "
              f"{overhead:.3f} | {compute:.3f} | {speedup:.2f}× | {ideal:.2f}× | {speedup / ideal:.2f} |")

if __name__ == "__main__":
    main()
