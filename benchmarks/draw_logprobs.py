"""Bytes per position with and without the draws' log-probs (`dump-logits --no-draw-logprobs`, format v3),
and what uint8 head log-probs would save on top.

A real teacher (SmolLM2-135M-Instruct, pipelines/teachers.py; fp32 on CPU) dumps the first --chars characters
of Tiny Shakespeare as packed CLM rows, once with and once without the option, for each sampled kind and size
below (kept in --work, reused). Per pair: bytes/position on disk (manifest totals: every column, footers),
sample_logprobs' own share (Parquet footers), and a check that both dumps drew the same ids and counts.
Then, for the counts-only top-k+sample caches, the shards re-written with topk_logprobs as uint8 codes at
1/16-nat steps (logprob_quantisation.py's encoding: measured there at ~1e-4 nats of KL and 0.5 % head-mass
error) instead of float16: measured only, not a format.

--stream-only CACHE...: stage two's stream (CacheStream, one worker, batch 16; positions per CPU-second)
over each given cache with log-probs and a counts-only copy of it (the same shards without sample_logprobs,
manifest as --no-draw-logprobs writes it), medians of --rounds interleaved rounds after a warm-up: what the
decoder's stand-in for the missing log-probs costs the loader (e.g. the caches dump_host_path.py leaves).

    nice python benchmarks/draw_logprobs.py [--chars 20000] [--max-length 256] [--work DIR] [--teacher DIR]
    nice python benchmarks/draw_logprobs.py --stream-only CACHE... [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))

KINDS = {  # name: DumpOptions fields
    "sample N=16": dict(targets="sample", samples=16),
    "sample N=32": dict(targets="sample", samples=32),
    "top-8 + sample N=16": dict(targets="top-k+sample", top_k=8, samples=16),
    "top-4 + sample N=8": dict(targets="top-k+sample", top_k=4, samples=8),
}


def dump(teacher: Path, corpus: Path, out: Path, max_length: int, **kind) -> Path:
    from kdcache.dump.run import DumpOptions, run_dump
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return out
    print(f"dumping {out.name} ...", flush=True)
    run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, task="clm", max_length=max_length,
                         device="cpu", dtype="fp32", batch_size=8, shard_rows=256, progress=False,
                         echo=lambda *a, **k: None, overwrite=True, **kind))
    return out


def totals(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())["totals"]


def shards(cache: Path) -> list[Path]:
    return sorted((cache / "data").glob("part-*.parquet"))


def column_share(cache: Path, name: str) -> int:
    from column_costs import column_bytes
    return sum(column_bytes(str(p))[0].get(name, 0) for p in shards(cache))


def same_draws(a: Path, b: Path) -> bool:
    columns = [c for c in ("topk_ids", "topk_logprobs", "sample_lengths", "sample_ids", "sample_counts", "labels")
               if c in pq.read_schema(shards(b)[0]).names]
    return all(pq.read_table(x, columns=columns).equals(pq.read_table(y, columns=columns))
               for x, y in zip(shards(a), shards(b), strict=True))


def uint8_head_bytes(cache: Path) -> int:
    """The shards' bytes with topk_logprobs stored as uint8 codes (1/16 nat), the writer otherwise the cache's."""
    from logprob_quantisation import uint8_steps

    from kdcache.cache.schema import DEFAULT_ROW_GROUP_ROWS, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, column_encodings
    total = 0
    for path in shards(cache):
        table = pq.read_table(path)
        column = table.column("topk_logprobs").combine_chunks()
        k = column.type.value_type.list_size
        codes, _ = uint8_steps(column.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32), 1 / 16)
        coded = pa.ListArray.from_arrays(column.offsets, pa.FixedSizeListArray.from_arrays(pa.array(codes, pa.uint8()), k))
        table = table.set_column(table.schema.get_field_index("topk_logprobs"), "topk_logprobs", coded)
        encodings = {path_: enc for path_, enc in column_encodings(table.schema).items()
                     if not path_.startswith("topk_logprobs")}  # one byte per value: nothing to split
        import io
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
                       row_group_size=DEFAULT_ROW_GROUP_ROWS, use_dictionary=False, write_statistics=False,
                       write_page_checksum=True, column_encoding=encodings)
        total += buf.getbuffer().nbytes
    return total


def counts_only_copy(cache: Path, dest: Path) -> Path:
    """`cache` re-written without sample_logprobs, its manifest as --no-draw-logprobs writes it."""
    import shutil

    from kdcache.cache.schema import format_version_for
    from kdcache.cache.shards import write_shard
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(cache, dest, ignore=shutil.ignore_patterns("*.parquet", "_*.stats.json"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["targets"]["draw_logprobs"] = False
    manifest["format_version"] = format_version_for(manifest["targets"])
    for i, entry in enumerate(manifest["shards"]):
        table = pq.read_table(cache / entry["file"]).drop_columns(["sample_logprobs"])
        table = table.replace_schema_metadata({"kdcache_format_version": str(manifest["format_version"])})
        manifest["shards"][i] = write_shard(dest, entry["index"], table)
    manifest["totals"]["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def stream_rate(cache: Path) -> float:
    import time

    from kdcache.cache.stream import CacheStream
    n, start = 0, time.process_time()
    for batch in CacheStream(cache, batch_size=16, seed=0):
        n += len(batch["labels"])
    return n / (time.process_time() - start)


def compare_streams(caches: list[Path], work: Path, rounds: int) -> None:
    import statistics

    import torch
    torch.set_num_threads(1)  # as in one DataLoader worker
    print("| cache | with log-probs | counts only | counts only ÷ with |")
    print("|---|---:|---:|---:|")
    for cache in caches:
        pair = {"with": cache, "counts": counts_only_copy(cache, work / f"{cache.name}-counts-only")}
        rates = {label: [] for label in pair}
        for _ in range(rounds + 1):
            for label, path in pair.items():
                rates[label].append(stream_rate(path))
        with_, counts = (statistics.median(rates[label][1:]) for label in pair)
        print(f"| {cache} | {with_:,.0f} | {counts:,.0f} | {counts / with_:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=20_000, help="characters of Tiny Shakespeare to dump")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-draw-logprobs"))
    ap.add_argument("--teacher", type=Path, default=None,
                    help="the converted SmolLM2 folder (default: pipelines/teachers.py makes or reuses it)")
    ap.add_argument("--stream-only", type=Path, nargs="+", default=None, metavar="CACHE")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.stream_only:
        work = Path(args.work) / "stream"
        work.mkdir(parents=True, exist_ok=True)
        return compare_streams(args.stream_only, work, args.rounds)
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    from dump_common import SHAKESPEARE
    from teachers import smollm2_teacher
    from train_common import command_line

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:args.chars])
    teacher = args.teacher or smollm2_teacher()
    rows = []
    for name, kind in KINDS.items():
        slug = name.replace(" ", "").replace("+", "_").replace("=", "")
        full = dump(teacher, corpus, work / slug, args.max_length, **kind)
        counts_only = dump(teacher, corpus, work / f"{slug}-counts", args.max_length, draw_logprobs=False, **kind)
        t_full, t_counts = totals(full), totals(counts_only)
        assert t_full["positions"] == t_counts["positions"]
        positions = t_full["positions"]
        uint8 = uint8_head_bytes(counts_only) if kind["targets"] == "top-k+sample" else None
        rows.append((name, positions, t_full["bytes"] / positions, t_counts["bytes"] / positions,
                     column_share(full, "sample_logprobs") / positions, same_draws(full, counts_only),
                     None if uint8 is None else uint8 / positions))
    print(f"# {command_line()}")
    print(f"\nSmolLM2-135M-Instruct, packed CLM rows of {args.max_length}, {rows[0][1]:,} positions per cache\n")
    print("| kind | B/position with log-probs (v2) | without (v3) | without ÷ with | sample_logprobs in the v2 cache "
          "| same ids and counts | + uint8 head log-probs (B/position, ÷ v3) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, _, full, counts, lp, same, uint8 in rows:
        extra = "–" if uint8 is None else f"{uint8:.1f} ({uint8 / counts:.2f})"
        print(f"| {name} | {full:.1f} | {counts:.1f} | {counts / full:.2f} | {lp:.1f} ({lp / full:.0%}) | "
              f"{'yes' if same else 'NO'} | {extra} |")


if __name__ == "__main__":
    main()
