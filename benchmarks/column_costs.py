"""What each cache column costs per position, and what Parquet's own encodings would save.

A real teacher (SmolLM2-135M-Instruct, from pipelines/teachers.py: Q4_1 weights dequantized) dumps Tiny
Shakespeare as packed causal-LM rows, once per target kind (kept in --work, reused). Then:

  1. bytes/position by column, the shards' tables written with the writer options before issue 15 (PLAIN
     everywhere) and now (schema.column_encodings), from the Parquet footers (each column chunk's compressed
     size, summed over row groups and shards; "footer etc." is the rest of the file), and the CPU time of
     encoding and decoding them (medians of 5), and stage two's stream over copies of the caches re-written
     both ways (the shards' sha256 in the copies' sidecars is stale: nothing here checks it);
  3. the same shards' tables re-written with other Parquet settings (same rows, same row groups), per
     column: byte-stream-split for float16 log-probs and integer ids, delta-binary-packed integers,
     dictionary pages, zstd levels; each column under its best setting, and the encode/decode CPU cost
     of the whole table under the chosen settings vs today's.

All columns stay what they are (same names, types and values): any Parquet reader decodes these
encodings, so only the writer's options change.

    nice python benchmarks/column_costs.py [--chars 60000] [--max-length 256] [--work DIR]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))

KINDS = {  # name: DumpOptions fields (the kinds and sizes BENCHMARKS.md's quality rows use)
    "top-64": dict(targets="top-k", top_k=64),
    "top-8": dict(targets="top-k", top_k=8),
    "sample N=32": dict(targets="sample", samples=32),
    "top-8 + sample N=16": dict(targets="top-k+sample", top_k=8, samples=16),
}


def dump_caches(work: Path, chars: int, max_length: int) -> dict[str, Path]:
    from dump_common import SHAKESPEARE
    from teachers import smollm2_teacher

    from kdcache.dump.run import DumpOptions, run_dump
    teacher = smollm2_teacher()
    corpus = work / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text(SHAKESPEARE.read_text()[:chars])
    caches = {}
    for name, kind in KINDS.items():
        out = work / name.replace(" ", "").replace("+", "_").replace("=", "")
        caches[name] = out
        if (out / "manifest.json").is_file() and '"complete": true' in (out / "manifest.json").read_text():
            continue
        print(f"dumping {name} ...", flush=True)
        run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, task="clm", max_length=max_length,
                             device="cpu", dtype="fp32", batch_size=8, shard_rows=256, progress=False,
                             echo=lambda *a, **k: None, overwrite=True, **kind))
    return caches


def shard_files(cache: Path) -> list[Path]:
    return sorted((cache / "data").glob("part-*.parquet"))


def positions_of(cache: Path) -> int:
    import json
    return json.loads((cache / "manifest.json").read_text())["totals"]["positions"]


def column_bytes(path_or_buffer) -> tuple[dict[str, int], int]:
    """Compressed bytes per top-level column (all row groups) and the file's total size."""
    f = pq.ParquetFile(path_or_buffer)
    meta = f.metadata
    sizes = defaultdict(int)
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    total = path_or_buffer.getbuffer().nbytes if isinstance(path_or_buffer, io.BytesIO) else os.path.getsize(path_or_buffer)
    return dict(sizes), total


def today_options() -> dict:
    from kdcache.cache.schema import DEFAULT_ROW_GROUP_ROWS, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL
    return dict(compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
                row_group_size=DEFAULT_ROW_GROUP_ROWS, use_dictionary=False, write_statistics=False,
                write_page_checksum=True)


LABELS = ("before", "now")


def writer_options(label: str, table: pa.Table) -> dict:
    """The writer before issue 15 ("before": PLAIN everywhere) or now (the cache's column_encodings)."""
    from kdcache.cache.schema import column_encodings
    if label == "before":
        return today_options()
    return dict(today_options(), column_encoding=column_encodings(table.schema))


def leaf_type(field: pa.Field) -> pa.DataType:
    t = field.type
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


def leaf_path(table: pa.Table, name: str) -> str:
    """The Parquet column path of a (nested) column, e.g. topk_ids.list.element.list.element: what
    column_encoding and use_dictionary name."""
    return pq.ParquetFile(write(table.select([name]).slice(0, 1), {})).metadata.row_group(0).column(0).path_in_schema


# Per-column variants: (label, writer options added to today's for that one column). Column encodings
# need use_dictionary off for that column, which today's writer already has.
def variants(field: pa.Field, path: str) -> list[tuple[str, dict]]:
    t = leaf_type(field)
    out = [("today (plain, zstd 3)", {})]
    if pa.types.is_integer(t):
        out += [("delta-binary-packed", {"column_encoding": {path: "DELTA_BINARY_PACKED"}}),
                ("byte-stream-split", {"column_encoding": {path: "BYTE_STREAM_SPLIT"}}),
                ("dictionary", {"use_dictionary": [path]})]
    if pa.types.is_floating(t):
        out += [("byte-stream-split", {"column_encoding": {path: "BYTE_STREAM_SPLIT"}}),
                ("dictionary", {"use_dictionary": [path]})]
    out += [("zstd 9", {"compression_level": 9}), ("zstd 19", {"compression_level": 19})]
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        out += [("byte-stream-split, zstd 9", {"column_encoding": {path: "BYTE_STREAM_SPLIT"}, "compression_level": 9})]
    return out


def write(table: pa.Table, options: dict) -> io.BytesIO:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    buf.seek(0)
    return buf


def per_column_variants(tables: list[pa.Table], positions: int) -> dict[str, dict[str, float]]:
    """column -> {variant: bytes/position}, each column written alone (one-column tables, same row groups)."""
    base = today_options()
    result = {}
    for name in tables[0].schema.names:
        field = tables[0].schema.field(name)
        result[name] = {}
        for label, extra in variants(field, leaf_path(tables[0], name)):
            total = 0
            for table in tables:
                try:
                    sizes, _ = column_bytes(write(table.select([name]), {**base, **extra}))
                except (pa.ArrowException, OSError, ValueError) as e:  # an encoding this type does not take
                    total = None
                    print(f"  ({name}: {label} not possible: {str(e).splitlines()[0]})")
                    break
                total += sizes[name]
            if total is not None:
                result[name][label] = total / positions
    return result


def cpu_cost(tables: list[pa.Table], options: dict, repeats: int = 5) -> tuple[float, float]:
    """(encode, decode) CPU-seconds for all tables, medians of `repeats`."""
    enc, dec = [], []
    for _ in range(repeats):
        start = time.process_time()
        buffers = [write(t, options) for t in tables]
        enc.append(time.process_time() - start)
        start = time.process_time()
        for b in buffers:
            f = pq.ParquetFile(b, page_checksum_verification=True)
            for g in range(f.metadata.num_row_groups):
                f.read_row_group(g, use_threads=False)
        dec.append(time.process_time() - start)
    return statistics.median(enc), statistics.median(dec)


def rewritten_copy(cache: Path, dest: Path, label: str) -> Path:
    """A copy of `cache` whose shards are re-written with writer_options(label), sidecars and manifest
    updated to the new sizes."""
    import json
    import shutil

    from kdcache.cache.schema import shard_stats_name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(cache, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["shards"]:
        table = pq.read_table(dest / entry["file"])
        (dest / entry["file"]).write_bytes(write(table, writer_options(label, table)).getvalue())
        entry["bytes"] = (dest / entry["file"]).stat().st_size
        (dest / shard_stats_name(entry["index"])).write_text(json.dumps(entry))
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def torch_threads_one() -> None:
    import torch
    torch.set_num_threads(1)  # as in one DataLoader worker


def compare_streams(cache: Path, work: Path, rounds: int) -> tuple[float, float]:
    """Stage two's stream over copies of `cache` re-written before / now: medians of `rounds` interleaved
    rounds in this process, after one warm-up round."""
    copies = {label: rewritten_copy(cache, work / f"{cache.parent.name}-{cache.name}-{label}", label)
              for label in LABELS}
    rates = {label: [] for label in copies}
    for _ in range(rounds + 1):
        for label, copy in copies.items():
            rates[label].append(stream_rate(copy))
    return statistics.median(rates["before"][1:]), statistics.median(rates["now"][1:])


def stream_rate(cache: Path) -> float:
    from kdcache.cache.stream import CacheStream
    n, start = 0, time.process_time()
    for batch in CacheStream(cache, batch_size=16, seed=0):
        n += len(batch["labels"])
    return n / (time.process_time() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=60_000, help="characters of Tiny Shakespeare to dump")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-column-costs"))
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--loader-rounds", type=int, default=5)
    ap.add_argument("--stream-only", type=Path, nargs="+", default=None, metavar="CACHE",
                    help="only the stream comparison, on these existing caches (e.g. the one dump_host_path.py leaves)")
    args = ap.parse_args()
    if args.stream_only:
        torch_threads_one()
        print("| cache | before (PLAIN) | now | now / before |")
        print("|---|---:|---:|---:|")
        for cache in args.stream_only:
            before, now = compare_streams(cache, Path(args.work) / "loader", args.loader_rounds)
            print(f"| {cache} | {before:,.0f} | {now:,.0f} | {now / before:.2f} |", flush=True)
        return
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    from train_common import command_line
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    caches = dump_caches(work, args.chars, args.max_length)
    print(f"# {command_line()}")

    # 1. Bytes per position by column, the shards' tables re-written as before this change (PLAIN) and now.
    tables = {kind: [pq.read_table(p) for p in shard_files(cache)] for kind, cache in caches.items()}
    costs, names, cpu = {}, [], {}
    for kind, kind_tables in tables.items():
        positions = positions_of(caches[kind])
        for label in LABELS:
            sizes, files = defaultdict(int), 0
            for table in kind_tables:
                s_, total = column_bytes(write(table, writer_options(label, table)))
                files += total
                for name, size in s_.items():
                    sizes[name] += size
                    if name not in names:
                        names.append(name)
            sizes["footer etc."] = files - sum(sizes.values())
            sizes["total"] = files
            costs[kind, label] = {name: size / positions for name, size in sizes.items()}
            encode, decode = cpu_cost(kind_tables, writer_options(label, kind_tables[0]))
            cpu[kind, label] = (encode / positions * 1e6, decode / positions * 1e6)
    names += ["footer etc.", "total"]
    print(f"\nBytes per position by column, before (PLAIN) / now (soft-target columns BYTE_STREAM_SPLIT); "
          f"packed CLM rows of {args.max_length}, {positions_of(next(iter(caches.values()))):,} positions per cache\n")
    print("| column | " + " | ".join(caches) + " |")
    print("|---|" + "---:|" * len(caches))
    for name in names:
        cells = []
        for kind in caches:
            before, now = costs[kind, "before"].get(name), costs[kind, "now"].get(name)
            cells.append("-" if before is None else (f"{before:.2f}" if abs(before - now) < 0.005
                                                     else f"{before:.2f} / **{now:.2f}**"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{costs[k, 'now']['total'] / costs[k, 'before']['total']:.3f}" for k in caches]
    print("| now / before | " + " | ".join(cells) + " |")
    for i, what in enumerate(("encode", "decode (page CRCs checked)")):
        cells = [f"{cpu[k, 'before'][i]:.2f} / {cpu[k, 'now'][i]:.2f}" for k in caches]
        print(f"| {what}: CPU-s per 1M positions, before / now | " + " | ".join(cells) + " |")

    # 2. Stage two's stream over each cache, its shards re-written as before and now (same rows).
    print(f"\nstage two's stream (CacheStream, one worker, batch 16): positions per CPU-second, medians of "
          f"{args.loader_rounds} interleaved rounds\n")
    print("| cache | before (PLAIN) | now | now / before |")
    print("|---|---:|---:|---:|")
    torch_threads_one()
    for kind, cache in caches.items():
        before, now = compare_streams(cache, work / "loader", args.loader_rounds)
        print(f"| {kind} | {before:,.0f} | {now:,.0f} | {now / before:.2f} |", flush=True)

    if args.skip_variants:
        return
    # 3. Each column under other Parquet settings (same tables).
    for kind, cache in caches.items():
        table = per_column_variants(tables[kind], positions_of(cache))
        labels = sorted({label for v in table.values() for label in v}, key=lambda s: (s != "today (plain, zstd 3)", s))
        print(f"\n{kind}: bytes/position per column under each writer setting (best in bold)\n")
        print("| column | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for name, row in table.items():
            best = min(row.values())
            cells = [("-" if label not in row else (f"**{row[label]:.3f}**" if row[label] == best else f"{row[label]:.3f}"))
                     for label in labels]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
