"""Stage one's host path per target kind: positions/s with an instant stand-in teacher.

Everything dump-logits does on the host runs for real — row planning, batching, collation, the per-batch
index tensors, splitting and compacting the device results per row, the Arrow build, Parquet/zstd,
fsync, sha256, the manifest — inside `run_dump` itself. Only the device work is replaced: the teacher's
forward returns nothing, and `TeacherRunner.device_targets` hands back precomputed results in its exact
layout (`zipf_results`: a Zipf-shaped teacher over a 49,152-token vocabulary, so ids, log-probs and the
number of distinct draws look like an LM teacher's; tests/test_sampled_targets.py checks the real sampler).
So this is the ceiling the host puts on a dump when the GPU is infinitely fast.

CLM rows of 512 tokens (every position a target), kinds side by side, alternating, repeated; each
figure is positions per second of the dump loop (wall) and per CPU-second of the process (all threads),
i.e. per core busy.

    python benchmarks/dump_host_path.py [--rows 512] [--reps 3] [--loader]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 49152
KINDS = {  # name: DumpOptions fields
    "top-64": dict(targets="top-k", top_k=64),
    "top-16": dict(targets="top-k", top_k=16),
    "sample N=16": dict(targets="sample", samples=16),
    "sample N=32": dict(targets="sample", samples=32),
    "top-8 + sample N=16": dict(targets="top-k+sample", top_k=8, samples=16),
    # --no-draw-logprobs (format v3): the same draws, no sample_logprobs column
    "sample N=32, counts only": dict(targets="sample", samples=32, draw_logprobs=False),
    "top-8 + sample N=16, counts only": dict(targets="top-k+sample", top_k=8, samples=16, draw_logprobs=False),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def llama_teacher(path: Path) -> Path:
    """A 1-layer Llama with a 49,152-token output (SmolLM2's size); its weights never run here."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dump_common import wordpiece_tokenizer
    if (path / "config.json").is_file():
        return path
    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=1024,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def zipf_results(kind: dict, positions: int, seed: int = 0):
    """What device_targets returns for `positions` targets of a Zipf-shaped teacher (exponent 1.0-2.0
    per position, over a per-position shuffle of the 49,152 ids), computed exactly in numpy: rank r
    has probability r^-s / Z(s); top-k = ranks 1..k; draws by inverse CDF (from the tail for
    top-k+sample), deduplicated with counts, most probable first. Distinct positions throughout one
    shard, so Parquet/zstd sees data no more repetitive than a real teacher's."""
    import numpy as np
    import torch
    rng = np.random.default_rng(seed)
    levels = np.linspace(1.0, 2.0, 33)
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    logp = -levels[:, None] * np.log(ranks)[None, :]
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    cdf = np.cumsum(np.exp(logp), axis=1)
    level = rng.integers(0, len(levels), positions)
    # id = (rank * a + b) mod VOCAB with a coprime to VOCAB (2^14 * 3): a bijection, different per position.
    a = rng.integers(0, VOCAB // 6, positions) * 6 + rng.choice([1, 5], positions)
    b = rng.integers(0, VOCAB, positions)
    to_id = lambda r: ((r * a[:, None] + b[:, None]) % VOCAB).astype(np.int32)  # noqa: E731
    k = kind.get("top_k", 0) if kind["targets"] != "sample" else 0
    finite = torch.ones(positions, dtype=torch.bool)
    head = (None, None)
    if k:
        r = np.arange(k)[None, :].repeat(positions, 0)
        head = (torch.from_numpy(to_id(r)), torch.from_numpy(logp[:, :k][level].astype(np.float16)))
    if kind["targets"] == "top-k":
        return head[0], head[1], finite, None
    n = kind["samples"]
    low = cdf[level, k - 1] if k else np.zeros(positions)
    u = low[:, None] + rng.random((positions, n)) * (cdf[level, -1] - low)[:, None]
    drawn = np.empty((positions, n), np.int64)
    for lv in range(len(levels)):  # inverse CDF, one exponent level at a time
        at = level == lv
        drawn[at] = np.searchsorted(cdf[lv], u[at], side="right")
    drawn = drawn.clip(max=VOCAB - 1)
    drawn.sort(axis=1)  # ascending rank = most probable first
    new = np.ones_like(drawn, dtype=bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    rows = np.arange(positions)[:, None].repeat(n, 1)
    unique = np.zeros_like(drawn)
    unique[rows, slot] = drawn
    counts = np.zeros((positions, n), np.int16)
    np.add.at(counts, (rows, slot), 1)
    lps = np.where(counts > 0, logp[level[:, None], unique], -65504.0).astype(np.float16)
    sampled = [torch.from_numpy(to_id(unique)), torch.from_numpy(lps), torch.from_numpy(counts)]
    return head[0], head[1], finite, sampled


def loader_rate(cache: Path, batch_size: int = 16) -> float:
    """Stage two's stream over the cache in this process (what one DataLoader worker does): positions
    per CPU-second, soft targets decoded and padded into batches."""
    from kdcache.cache.stream import CacheStream
    n, start = 0, cpu_seconds()
    for batch in CacheStream(cache, batch_size=batch_size, seed=0):
        n += len(batch["labels"])
    return n / (cpu_seconds() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512, help="CLM rows of --max-length tokens")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--shard-rows", type=int, default=128)
    ap.add_argument("--reps", "--repeats", type=int, default=3, dest="reps")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here (compare_revisions.py)")
    ap.add_argument("--loader", action="store_true",
                    help="also time stage two's stream over each cache (positions per CPU-second, one worker)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-host-path"))
    ap.add_argument("--only", nargs="+", default=None, metavar="KIND",
                    help="only these kinds (names as in KINDS; ratios are to the first when top-64 is left out)")
    args = ap.parse_args()
    kinds = {name: KINDS[name] for name in (args.only or KINDS)}

    import torch
    torch.set_num_threads(1)
    from dump_common import SHAKESPEARE
    import kdcache.dump.run as run
    from kdcache.dump.run import DumpOptions, TeacherRunner, run_dump

    work = Path(args.work)
    teacher = llama_teacher(work / "llama-49k")
    corpus = work / "corpus.txt"
    # ~11 wordpiece tokens per line: enough lines for the rows asked for.
    corpus.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:args.rows * args.max_length // 8]) + "\n")

    pool_positions = args.shard_rows * args.max_length  # one shard's targets: nothing repeats within a file
    pools = {name: zipf_results(kind, pool_positions) for name, kind in kinds.items()}
    started = {}

    class InstantRunner(TeacherRunner):
        """The real TeacherRunner with the device's work replaced by replaying `pool`."""
        pool = None

        def forward(self, batch):
            return None

        def device_targets(self, logits, b, p, e):
            started.setdefault("cpu", cpu_seconds())
            started.setdefault("wall", time.perf_counter())
            at = (started.setdefault("next", 0) + torch.arange(len(b))) % pool_positions
            started["next"] += len(b)
            out = tuple(None if t is None else ([x[at] for x in t] if isinstance(t, list) else t[at])
                        for t in self.pool)
            if out[3] is not None and not self.draw_logprobs:  # as TeacherRunner: no log-probs to the host
                out[3][1] = None
            return out

    run.TeacherRunner = InstantRunner
    for name, pool in pools.items():
        if pool[3] is not None:
            distinct = float((pool[3][2] > 0).sum(1).float().mean())
            print(f"{name}: {distinct:.1f} distinct drawn ids per position (mean over the pool)")

    results = {name: [] for name in kinds}
    for rep in range(args.reps):
        for name, kind in kinds.items():  # alternating, so drift on a shared machine hits every kind
            InstantRunner.pool = pools[name]
            out = work / "cache"
            shutil.rmtree(out, ignore_errors=True)
            started.clear()
            result = run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, task="clm",
                                          max_length=args.max_length, shard_rows=args.shard_rows, device="cpu",
                                          limit=None, progress=False, echo=lambda *a, **k: None, **kind))
            wall, cpu = time.perf_counter() - started["wall"], cpu_seconds() - started["cpu"]
            positions = result.positions
            per_position_bytes = result.manifest["totals"]["bytes"] / positions
            loader = loader_rate(out) if args.loader else float("nan")
            results[name].append((positions / wall, positions / cpu, per_position_bytes, loader))
            print(f"rep {rep} {name}: {positions:,} positions in {wall:.2f} s wall, {cpu:.2f} CPU-s -> "
                  f"{positions / wall:,.0f} positions/s, {positions / cpu:,.0f} per CPU-second; "
                  f"{per_position_bytes:.1f} B/position; stream decode {loader:,.0f} positions per CPU-second",
                  flush=True)

    base = "top-64" if "top-64" in results else next(iter(results))
    base_wall = statistics.median(r[0] for r in results[base])
    base_cpu = statistics.median(r[1] for r in results[base])
    base_loader = statistics.median(r[3] for r in results[base])
    print(f"\n| target kind | dump host path, positions/s (wall, median) | positions per CPU-second (median) "
          f"| ÷ {base} (per CPU-second) | bytes/position | stream decode, positions per CPU-second (÷ {base}) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        loader = statistics.median(r[3] for r in rows)
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} | {cpu / base_cpu:.2f} (wall {wall / base_wall:.2f}) | {rows[0][2]:.1f} "
              f"| {loader:,.0f} ({loader / base_loader:.2f}) |")
        summary[name] = {"dump_per_cpu_second": cpu, "bytes_per_position": rows[0][2]}
        if args.loader:
            summary[name]["loader_per_cpu_second"] = loader
    if args.json:
        import json
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
