"""Token selection (`dump-logits --select-positions`): bytes per corpus token and per selected position, side
by side with the same data dumped without selection, on a real teacher.

A real teacher (SmolLM2-135M-Instruct, from pipelines/teachers.py, or --teacher DIR) dumps the first --chars
of Tiny Shakespeare as packed causal-LM rows, for each target kind at each fraction (off = every position).
Per cache: bytes on disk per corpus token (file bytes / every target position) and per selected position,
the share of the soft-target columns, the teacher's mean entropy at the selected and unselected positions
(from the dump's own selection: a check that it picks the high-entropy ones), the dump's wall time
(one process, CPU, the teacher's forward dominating), and stage two's stream over the cache: every target
position (selected or not) per CPU-second, median of --rounds, and its ratio to the unselected cache's.
Complete caches in --work are reused (their dump time read from the manifest).

    nice python benchmarks/select_positions.py [--teacher DIR] [--chars 60000] [--max-length 256] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))

KINDS = {  # name: DumpOptions fields (the kinds and sizes BENCHMARKS.md's quality rows use)
    "top-k+sample 8 + 16": dict(targets="top-k+sample", top_k=8, samples=16),
    "sample N=32": dict(targets="sample", samples=32),
}
FRACTIONS = {"top-k+sample 8 + 16": (None, 0.5, 0.2, 0.1), "sample N=32": (None, 0.2)}


def dump(teacher: Path, corpus: Path, out: Path, max_length: int, kind: dict, fraction) -> float:
    from kdcache.dump.run import DumpOptions, run_dump

    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return json.loads(manifest.read_text())["dump"]["seconds"]
    start = time.perf_counter()
    run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, task="clm", max_length=max_length,
                         device="cpu", dtype="fp32", batch_size=8, shard_rows=256, progress=False,
                         echo=lambda *a, **k: None, overwrite=True, select_positions=fraction, **kind))
    return time.perf_counter() - start


def soft_bytes(cache: Path) -> int:
    """Compressed bytes of the kind's soft-target columns (and soft_mask), from the Parquet footers."""
    import pyarrow.parquet as pq

    from kdcache.cache.kinds import KINDS as REGISTRY
    soft = {name for kind in REGISTRY.values() for name in kind.columns} | {"soft_mask"}
    total = 0
    for path in sorted((cache / "data").glob("part-*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.row_group(g).num_columns):
                chunk = meta.row_group(g).column(c)
                if chunk.path_in_schema.split(".")[0] in soft:
                    total += chunk.total_compressed_size
    return total


def entropies(teacher: Path, cache: Path) -> tuple[float, float]:
    """Mean teacher entropy (nats) at the selected and at the unselected positions, by a direct forward."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    table = pq.read_table(cache / "data", columns=["input_ids", "positions", "soft_mask"]).slice(0, 16)
    chosen, rest = [], []
    with torch.no_grad():
        for ids, pos, mask in zip(*(table.column(c).to_pylist() for c in ("input_ids", "positions", "soft_mask"))):
            lp = model(torch.tensor([ids])).logits[0, pos].log_softmax(-1)
            h = -(lp.exp() * lp).sum(-1).numpy()
            mask = np.array(mask, dtype=bool)
            chosen.append(h[mask])
            rest.append(h[~mask])
    return float(np.concatenate(chosen).mean()), float(np.concatenate(rest).mean()) if any(len(r) for r in rest) else float("nan")


def stream_rate(cache: Path, rounds: int) -> float:
    """Target positions per CPU-second of one in-process pass of stage two's stream (decode, read-time
    checks, collate), median of `rounds` fresh passes."""
    import statistics

    from kdcache.cache.stream import CacheStream, open_cache
    opened = open_cache(cache)
    rates = []
    for _ in range(rounds):
        start, n = time.process_time(), 0
        for batch in CacheStream(opened, batch_size=32, shuffle=False):
            n += batch["labels"].shape[0]
        rates.append(n / (time.process_time() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="model dir (default: pipelines/teachers.py's SmolLM2)")
    parser.add_argument("--chars", type=int, default=60000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(2)

    if args.teacher is None:
        from teachers import smollm2_teacher
        args.teacher = smollm2_teacher()
    from dump_common import SHAKESPEARE
    work = args.work or Path(tempfile.mkdtemp(prefix="kdcache-select-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:args.chars])

    print(f"teacher {args.teacher}, {args.chars:,} chars of Tiny Shakespeare, packed CLM rows of {args.max_length}, "
          f"fp32 CPU; work {work}\n")
    print("| kind | --select-positions | positions | selected | B per corpus token | B per selected position "
          "| soft columns, B per corpus token | entropy selected / unselected (nats) | dump s "
          "| stream, positions per CPU-s (÷ off) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kind in KINDS.items():
        off = None
        for fraction in FRACTIONS[name]:
            out = work / f"{kind['targets']}-{fraction}"
            seconds = dump(args.teacher, corpus, out, args.max_length, kind, fraction)
            m = json.loads((out / "manifest.json").read_text())
            positions, total = m["totals"]["positions"], m["totals"]["bytes"]
            if fraction is None:
                selected, ent = positions, "–"
            else:
                import pyarrow.parquet as pq
                selected = sum(sum(x) for x in pq.read_table(out / "data", columns=["soft_mask"]).column(0).to_pylist())
                ent = "{:.2f} / {:.2f}".format(*entropies(args.teacher, out))
            rate = stream_rate(out, args.rounds)
            off = off or rate
            print(f"| {name} | {fraction or 'off'} | {positions:,} | {selected:,} | {total / positions:.2f} | "
                  f"{total / selected:.2f} | {soft_bytes(out) / positions:.2f} | {ent} | {seconds:.0f} "
                  f"| {rate:,.0f} ({rate / off:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
