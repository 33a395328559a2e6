"""dump-logits wall time ÷ a bare teacher forward over the same batches (goal ≤ 1.05 on CPU).

Side by side in one process, alternating, several repetitions, median reported. The teacher is a
randomly initialised BERT-base-shaped masked LM (110M parameters, vocab 30522): timing does not
depend on the weights. The "bare forward" runs exactly the batches dump-logits forms (same rows,
same length-sorted batches, same padding) through model(**batch) and nothing else.

    python benchmarks/dump_overhead.py [--rows 24] [--max-length 128] [--reps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=24, help="rows of --max-length tokens (packed MLM)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens-per-batch", type=int, default=2048)
    ap.add_argument("--shard-rows", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-bench"))
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from dump_common import SHAKESPEARE, bert_mlm_teacher
    from kdcache.dump.batching import make_batches
    from kdcache.dump.corpus import load_corpus
    from kdcache.dump.rows import MaskingRecipe, RowPlan, tokenize_corpus
    from kdcache.dump.run import DumpOptions, TeacherRunner, run_dump
    from kdcache.dump.teacher import load_teacher

    work = Path(args.work)
    teacher_dir = bert_mlm_teacher(work / "bert-base-random")
    # enough lines for the requested rows (~13 tokens per line)
    corpus = work / "overhead_corpus.txt"
    corpus.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:args.rows * args.max_length // 9]) + "\n")
    common = dict(teacher=str(teacher_dir), data=str(corpus), max_length=args.max_length, targets="top-k", top_k=args.top_k,
                  shard_rows=args.shard_rows, max_tokens_per_batch=args.max_tokens_per_batch, device=args.device,
                  dtype=args.dtype,
                  progress=False, echo=lambda *a, **k: None)

    # The exact batches dump-logits forms, built with its own planner.
    from kdcache.dump.run import DTYPES, resolve_dtype
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    teacher = load_teacher(str(teacher_dir), dtype=DTYPES[dtype], device=device)
    tok_ds = tokenize_corpus(load_corpus(str(corpus)), teacher.tokenizer, task="mlm", max_length=args.max_length, packing=True)
    plan = RowPlan(tok_ds, task="mlm", max_length=args.max_length, packing=True, shard_rows=args.shard_rows,
                   masking=MaskingRecipe(teacher.tokenizer, teacher.vocab_size, 0.15, 0))
    runner = TeacherRunner(teacher, "mlm", args.top_k, device, teacher.tokenizer.pad_token_id)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shards = [plan.rows(i) for i in range(plan.num_shards)]
    batches = [[rows[i] for i in b] for rows in shards
               for b in make_batches([len(r.input_ids) for r in rows], max_tokens=args.max_tokens_per_batch)]
    real = sum(len(r.input_ids) for b in batches for r in b)
    print(f"teacher: BERT-base shape, {teacher.fingerprint['num_parameters'] or sum(p.numel() for p in teacher.model.parameters()):,} params; "
          f"{plan.num_rows} rows, {real:,} tokens, {len(batches)} batches, {plan.num_shards} shards; torch threads {args.threads}; "
          f"device {device}, dtype {dtype}")

    def bare():
        t, c = time.perf_counter(), time.process_time()
        for b in batches:
            runner.forward(runner.collate(b))
        sync()
        return time.perf_counter() - t, time.process_time() - c

    def dumped():
        out = work / "overhead_cache"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        result = run_dump(DumpOptions(out=out, **common))
        total, cpu = time.perf_counter() - t, time.process_time() - c
        assert result.rows == plan.num_rows
        return result.seconds, total, cpu

    bare()  # warm-up (allocator, oneDNN kernels)
    loop_ratios, total_ratios, cpu_ratios, bares, loops = [], [], [], [], []
    for rep in range(args.reps):
        (b1, c1) = bare()
        loop, total, cpu = dumped()
        (b2, c2) = bare()
        b, c = (b1 + b2) / 2, (c1 + c2) / 2  # bracket the dump so drift in machine load cancels
        bares.append(b), loops.append(loop)
        loop_ratios.append(loop / b), total_ratios.append(total / b), cpu_ratios.append(cpu / c)
        print(f"rep {rep}: bare forward {b:.2f} s wall (before {b1:.2f}, after {b2:.2f}), {c:.2f} s CPU; "
              f"dump loop {loop:.2f} s -> {loop / b:.3f}; whole run_dump call {total:.2f} s -> {total / b:.3f}; "
              f"CPU time whole call {cpu:.2f} s -> {cpu / c:.3f}")
    print(f"median dump-loop / bare-forward wall ratio: {statistics.median(loop_ratios):.3f}")
    print(f"median whole-command (load, hash, tokenize, dump) / bare-forward wall ratio: {statistics.median(total_ratios):.3f}")
    print(f"median whole-command / bare-forward CPU-time ratio (insensitive to other load on the machine): "
          f"{statistics.median(cpu_ratios):.3f}")
    print(f"median tokens/s: bare {real / statistics.median(bares):,.0f}, dump loop {real / statistics.median(loops):,.0f}")


if __name__ == "__main__":
    main()
