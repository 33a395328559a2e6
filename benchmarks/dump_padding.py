"""Padding waste of dump-logits batches: processed (padded) tokens ÷ real tokens (goal ≤ 1.05).

Tiny Shakespeare, one row per line (--no-packing: the case where lengths vary). The figure comes from
a real dump's manifest (dump.padding_ratio) with default settings, plus the same planner at other
settings, and naive corpus-order batching for contrast.

    python benchmarks/dump_padding.py [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-bench"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from dump_common import SHAKESPEARE, bert_mlm_teacher
    from kdcache.dump.batching import MAX_PADDING_RATIO, make_batches, padded_tokens
    from kdcache.dump.corpus import load_corpus
    from kdcache.dump.rows import MaskingRecipe, RowPlan, tokenize_corpus
    from kdcache.dump.run import DEFAULT_MAX_TOKENS_PER_BATCH, DumpOptions, run_dump
    from kdcache.dump.teacher import load_teacher

    work = Path(args.work)
    teacher_dir = bert_mlm_teacher(work / "bert-tiny-random", size="tiny")
    out = work / "padding_cache"
    shutil.rmtree(out, ignore_errors=True)
    result = run_dump(DumpOptions(teacher=str(teacher_dir), data=str(SHAKESPEARE), out=out, packing=False, max_length=128,
                                  targets="top-k", top_k=8, device="cpu", progress=False, echo=lambda *a, **k: None))
    print(f"real dump, Tiny Shakespeare unpacked, defaults (--shard-rows 4096, --max-tokens-per-batch {DEFAULT_MAX_TOKENS_PER_BATCH}): "
          f"{result.rows:,} rows, {result.real_tokens:,} real tokens, {result.padded_tokens:,} processed -> "
          f"padding ratio {result.padded_tokens / result.real_tokens:.4f} ({result.seconds:.1f} s)")

    teacher = load_teacher(str(teacher_dir), load_weights=False)
    tokenized = tokenize_corpus(load_corpus(str(SHAKESPEARE)), teacher.tokenizer, task="mlm", max_length=128, packing=False)
    masking = MaskingRecipe(teacher.tokenizer, teacher.vocab_size, 0.15, 0)
    for shard_rows, batch_size, max_tokens, cap in ((4096, None, 8192, MAX_PADDING_RATIO), (4096, None, 8192, None),
                                                    (4096, 32, None, MAX_PADDING_RATIO), (1024, 64, None, MAX_PADDING_RATIO),
                                                    (256, 32, 4096, MAX_PADDING_RATIO)):
        plan = RowPlan(tokenized, task="mlm", max_length=128, packing=False, shard_rows=shard_rows, masking=masking)
        real = padded = naive = num_batches = 0
        for shard in range(plan.num_shards):
            lengths = [int(plan.lengths[r]) for r in plan.row_range(shard)]
            real += sum(lengths)
            batches = make_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, max_padding=cap)
            num_batches += len(batches)
            padded += padded_tokens(lengths, batches)
            size = batch_size or 32
            order = [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
            naive += padded_tokens(lengths, order)
        print(f"planner --shard-rows {shard_rows} --batch-size {batch_size} --max-tokens-per-batch {max_tokens}, padding cap {cap}: "
              f"sorted {padded / real:.4f} in {num_batches} batches; corpus order (batches of {batch_size or 32}) {naive / real:.4f}")


if __name__ == "__main__":
    main()
