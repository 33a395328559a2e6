"""The dump: validate inputs, plan rows and shards, run the teacher, hand shards to the writer.

Resume and multi-process dumping follow from one rule: shard i always holds the same rows.
A shard is complete once its sidecar exists; a run skips complete shards; under torchrun rank r
takes shards i with i % world_size == r, and rank 0 keeps the manifest.

Each step has its own module: options.py (checks), output.py (what happens to --out), record.py
(the manifest's content), runner.py (the forward loop), writer.py (shards), summary.py (reports).
"""
from __future__ import annotations

import os
import time

import torch

from ..cache import schema as S
from ..cache.manifest import manifest_path, write_cache_json
from ..cache.shards import complete_shards
from ..distributed import ProcessGroup
from ..distributed import setup as setup_process_group
from ..errors import KdcacheError
from .batching import make_batches, padded_tokens
from .bookkeeping import ManifestKeeper
from .chat_spans import tokenize_chat
from .confirm import check_complete
from .options import (  # noqa: F401 - DTYPES, DEFAULT_*, resolve_dtype: re-exported for benchmarks/
    DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS_PER_BATCH, DEFAULT_SAMPLES, DTYPES, DumpOptions, DumpResult,
    resolve_device, resolve_dtype, validate,
)
from .output import prepare_output, resolve_out
from .record import accumulate_runs, build_manifest
from .rows import MaskingRecipe, RowPlan, tokenize_corpus
from .runner import TeacherRunner, forward_shard
from .summary import dry_run, make_bar, summarize
from .writer import ShardWriter


def join_process_group() -> ProcessGroup:
    """Stage one joins the process group with gloo whatever the device: it only needs barriers
    and one broadcast, on the host. See kdcache.distributed for how a failing rank stops the rest."""
    return setup_process_group("cpu", backend="gloo")


def shards_for_rank(num_shards: int, rank: int, world: int, done) -> list[int]:
    """Rank r dumps the shards i with i % world == r that are not complete yet."""
    return [i for i in range(num_shards) if i % world == rank and i not in done]


def run_dump(opts: DumpOptions) -> DumpResult:
    dist = join_process_group()
    try:
        with dist.failing_together():
            return _run(opts, dist)
    finally:
        dist.close()


def _run(opts: DumpOptions, dist: ProcessGroup) -> DumpResult:
    echo = opts.echo if dist.rank == 0 else (lambda *a, **kw: None)
    out = resolve_out(opts.out)
    device, dtype, teacher, corpus, task, k, packing, max_length = validate(opts, dist)
    batch_size = opts.batch_size
    max_tokens = opts.max_tokens_per_batch or (None if batch_size else DEFAULT_MAX_TOKENS_PER_BATCH)

    # Rank 0 tokenizes first so the others reuse datasets' cache instead of racing to write it.
    if dist.rank != 0:
        dist.barrier()
    if corpus.chat is not None:  # conversations: rendered with the chat template, assistant targets only
        tokenized = tokenize_chat(corpus, teacher.tokenizer, max_length=max_length, strict=opts.strict, echo=echo)
    else:
        tokenized = tokenize_corpus(corpus, teacher.tokenizer, task=task, max_length=max_length, packing=bool(packing),
                                    label2id=getattr(teacher.config, "label2id", None), num_labels=teacher.target_vocab_size)
    if dist.rank == 0:
        dist.barrier()
    masking = MaskingRecipe(teacher.tokenizer, teacher.vocab_size, opts.mlm_probability, opts.seed) if task == "mlm" else None
    plan = RowPlan(tokenized, task=task, max_length=max_length, packing=bool(packing), shard_rows=opts.shard_rows,
                   masking=masking, mask_copies=opts.mask_copies)
    targets = {"kind": opts.targets, "k": k, "samples": opts.samples if S.kind_of(opts.targets).draws else 0}
    if not opts.draw_logprobs:  # only then: every other cache's manifest (and identity) stays as v2 wrote it
        targets["draw_logprobs"] = False
    if opts.select_positions is not None:  # format v3; absent otherwise, so other caches stay v2 byte for byte
        targets.update(select_positions=float(opts.select_positions), select_by=S.SELECT_BY_ENTROPY)
    manifest = build_manifest(opts, teacher, corpus, task=task, k=k, dtype=dtype, max_length=max_length,
                              packing=packing, num_shards=plan.num_shards, targets=targets)
    arrow_schema = S.schema_for_manifest(manifest)

    if opts.dry_run:
        return dry_run(plan, manifest, arrow_schema, echo)

    error = None
    previous_run = {}
    done = {}  # rank 0 lists data/ once, in prepare_output; the other ranks once each, below
    if dist.rank == 0:
        try:
            previous_run = prepare_output(out, manifest, teacher, opts.overwrite, done)
        except KdcacheError as e:
            error = str(e)
    dist.share_error(error)

    if dist.rank != 0:
        done = complete_shards(out)
    mine = shards_for_rank(plan.num_shards, dist.rank, dist.world, done)
    if done and mine:
        echo(f"resuming: {len(done)} of {plan.num_shards} shards already complete")

    # Rank 0 owns the manifest, rewritten at a cost per shard that stays flat (bookkeeping.py).
    keeper = ManifestKeeper(out, manifest, done, world=dist.world)

    def on_written(stats):
        if dist.rank == 0:
            keeper.add(stats)

    runner = TeacherRunner(teacher, task, k, device, pad_id=teacher.tokenizer.pad_token_id or 0,
                           kind=targets["kind"], samples=targets["samples"], seed=opts.seed,
                           draw_logprobs=opts.draw_logprobs, select_positions=opts.select_positions)
    writer = ShardWriter(out, arrow_schema, k, on_written=on_written, threads=writer_threads(device))
    total_tokens = sum(plan.shard_tokens(i) for i in mine)
    real, padded = 0, 0
    start = time.perf_counter()
    bar = make_bar(total_tokens, opts.progress, dist)

    def count_tokens(n: int) -> None:
        nonlocal real
        real += n
        if bar is not None:
            bar.update(n)

    try:
        for shard in mine:
            rows = plan.rows(shard)
            lengths = [len(r.input_ids) for r in rows]
            batches = make_batches(lengths, batch_size=batch_size, max_tokens=max_tokens)
            padded += padded_tokens(lengths, batches)
            results = forward_shard(runner, rows, batches, shard=shard, dtype=dtype, on_tokens=count_tokens)
            writer.submit(shard, results)
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
            if dist.rank == 0:
                keeper.flush()  # a run stopped by an error still records the shards it completed
    seconds = time.perf_counter() - start
    dist.barrier()

    run_info = {"seconds": round(seconds, 3), "tokens_per_second": round(real / seconds, 1) if seconds > 0 else None,
                "device": str(device), "world_size": dist.world, "real_tokens": real, "padded_tokens": padded,
                "padding_ratio": round(padded / real, 4) if real else None,
                "batch_size": batch_size, "max_tokens_per_batch": max_tokens}
    final = keeper.final()  # every rank: what data/ really holds, read back
    final["dump"] = accumulate_runs(previous_run, run_info)
    if dist.rank == 0:
        write_cache_json(manifest_path(out), final)
    check_complete(final, out)  # every shard was written by now: one that does not read back is a failure
    summary = summarize(final, run_info, out)
    echo(summary)
    return DumpResult(final, final["totals"]["rows"], final["totals"]["positions"], plan.num_shards,
                      real, padded, seconds, summary)


def writer_threads(device: torch.device) -> int:
    """One shard writer on CPU (the teacher needs the cores); on a GPU the host only feeds it, and
    one writer thread would cap the dump at ~100k positions/s, so use a few."""
    if device.type == "cpu":
        return 1
    return max(1, min(4, (os.cpu_count() or 2) - 1))


