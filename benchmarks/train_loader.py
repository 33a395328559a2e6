"""Loader alone: target positions decoded per second by ONE worker (Parquet read + zstd +
Arrow -> padded tensors + (N, k) top-k ids/log-probs), at k = 64. Goal: >= 500k/s/worker.

The stream runs in this process (num_workers=0 is exactly what one DataLoader worker does),
with one intra-op thread, over a synthetic cache written by the real shard writer, and
optionally over a real cache repeated to size (--real-cache, e.g. the quickstart's
runs/causal_lm-small/cache: real top-k ids compress ~2x, so zstd costs more than on random ids).
Next to it, the floor: reading the same row groups' columns with pyarrow and nothing else;
"loader / decode" is what kdcache's shuffling and collation add to that.
Last, the cost of the read-time integrity check: the same loader with and without verifying
the shards' Parquet page CRCs, interleaved (--crc-only runs just that); and the cost of the
read-time semantic checks (ids in range; sampled targets: counts sum to N, ids distinct per
position), also on a sampled cache, and the checks' own speed on decoded row groups
(--checks-only runs just that).

    python benchmarks/train_loader.py [--rows 4000] [--k 64] [--repeats 3] [--real-cache DIR] [--crc-only]
                                      [--crc-pairs 15] [--checks-only]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import torch

from train_common import Timer, command_line, synthetic_cache


def positions_per_second(cache: Path, *, batch_size: int, soft: bool = True) -> tuple[float, float]:
    """(positions per wall-clock second, positions per CPU second of this process, all threads).
    On a shared machine the CPU-second rate is what one worker with a core to itself achieves."""
    from kdcache.cache.stream import CacheStream
    stream = CacheStream(cache, batch_size=batch_size, seed=0, soft_targets=soft)
    n = 0
    cpu = time.process_time()
    with Timer() as t:
        for batch in stream:
            n += len(batch["labels"])
    return n / t.seconds, n / (time.process_time() - cpu)


def decode_only(cache: Path, soft: bool = True, verify: bool = False) -> float:
    """Positions per CPU-second of reading every row group's stream columns, nothing else
    (verify: checking the page CRCs too)."""
    import pyarrow.parquet as pq

    from kdcache.cache.stream import CacheStream
    stream = CacheStream(cache, batch_size=1, soft_targets=soft)
    columns = stream._columns()
    n = 0
    cpu = time.process_time()
    for path in stream.cache.shard_paths:
        f = pq.ParquetFile(path, page_checksum_verification=verify)
        for g in range(f.metadata.num_row_groups):
            n += int(pc.sum(pc.list_value_length(f.read_row_group(g, columns=columns, use_threads=False)
                                                  .column("positions"))).as_py())
    return n / (time.process_time() - cpu)


def crc_cost(cache: Path, *, batch_size: int, repeats: int) -> dict:
    """Loader positions per CPU-second with page-CRC verification and without (the same stream,
    its shards opened either way), and Parquet decode alone both ways, in `repeats` adjacent
    pairs with the order alternating. Costs are medians of the pairs' time ratios - 1, so a load
    change on the shared machine between pairs cancels out."""
    import pyarrow.parquet as pq

    from kdcache.cache import stream as stream_module
    verifying = stream_module.open_shard

    def unverified(path):
        return pq.ParquetFile(path)

    def loader(verify: bool) -> float:
        stream_module.open_shard = verifying if verify else unverified
        try:
            return positions_per_second(cache, batch_size=batch_size)[1]
        finally:
            stream_module.open_shard = verifying

    rates = {"loader": ([], []), "decode": ([], [])}
    for i in range(repeats):
        for name, measure in (("loader", loader), ("decode", lambda verify: decode_only(cache, verify=verify))):
            order = (True, False) if i % 2 == 0 else (False, True)
            got = {verify: measure(verify) for verify in order}
            rates[name][0].append(got[True])
            rates[name][1].append(got[False])
    out = {}
    for name, (verified, unverified_rates) in rates.items():
        out[name] = (statistics.median(verified), statistics.median(unverified_rates),
                     statistics.median(b / a - 1 for a, b in zip(verified, unverified_rates)))
    return out


def checks_cost(cache: Path, *, batch_size: int, repeats: int) -> tuple[float, float, float]:
    """(loader positions per CPU-second with the read-time semantic checks, without, median cost),
    in `repeats` adjacent pairs with the order alternating, as crc_cost."""
    from kdcache.cache import stream as stream_module
    checking = stream_module.check_rows
    with_checks, without = [], []
    for i in range(repeats):
        for check in ((True, False) if i % 2 == 0 else (False, True)):
            stream_module.check_rows = checking if check else (lambda table, manifest: None)
            try:
                (with_checks if check else without).append(positions_per_second(cache, batch_size=batch_size)[1])
            finally:
                stream_module.check_rows = checking
    return (statistics.median(with_checks), statistics.median(without),
            statistics.median(b / a - 1 for a, b in zip(with_checks, without)))


def checks_alone(cache: Path, *, repeats: int) -> float:
    """The read-time semantic checks by themselves (check_rows on every row group, decoded once
    beforehand): target positions checked per CPU-second, median of `repeats` passes."""
    import pyarrow.parquet as pq

    from kdcache.cache.stream import open_cache
    from kdcache.cache.verify import check_rows
    opened = open_cache(cache)
    tables = []
    for path in opened.shard_paths:
        pf = pq.ParquetFile(path)
        tables += [pf.read_row_group(g) for g in range(pf.num_row_groups)]
    positions = opened.manifest["totals"]["positions"]
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        for table in tables:
            assert check_rows(table, opened.view) is None
        rates.append(positions / (time.process_time() - start))
    return statistics.median(rates)


def sampled_cache(out: Path, *, rows: int, length: int, vocab_size: int, samples: int = 16, seed: int = 0) -> Path:
    """A CLM `sample` cache of random rows: per position 1..samples distinct ids whose counts sum to
    `samples`, written with the real shard writer."""
    import numpy as np
    import pyarrow as pa

    from kdcache.cache.files import atomic_write_json
    from kdcache.cache.schema import FORMAT_VERSION, arrow_schema
    from kdcache.cache.shards import write_shard

    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    schema = arrow_schema(k=0, vocab_size=vocab_size, max_length=length, kind="sample", samples=samples)
    n_pos = rows * length
    lengths = rng.integers(1, samples + 1, n_pos)
    entry = np.repeat(np.arange(n_pos), lengths)
    within = np.arange(len(entry)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = (np.repeat(rng.integers(0, vocab_size, n_pos), lengths) + within * 7919) % vocab_size  # distinct per position
    counts = np.ones(len(entry), np.int64)
    counts[np.cumsum(lengths) - lengths] += samples - lengths  # the first entry takes the rest of the draws
    logprobs = -rng.gamma(2.0, 2.0, len(entry)).astype(np.float16)
    row_offsets = lambda per_row: pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))  # noqa: E731
    entries_per_row = np.add.reduceat(lengths, np.arange(0, n_pos, length))
    field = lambda name: schema.field(name).type.value_type  # noqa: E731
    table = pa.table({
        "example_id": pa.array(np.arange(rows), pa.int64()),
        "input_ids": pa.ListArray.from_arrays(row_offsets(np.full(rows, length)),
                                              pa.array(rng.integers(0, vocab_size, n_pos), field("input_ids"))),
        "positions": pa.ListArray.from_arrays(row_offsets(np.full(rows, length)),
                                              pa.array(np.tile(np.arange(length), rows), field("positions"))),
        "labels": pa.ListArray.from_arrays(row_offsets(np.full(rows, length)),
                                           pa.array(rng.integers(0, vocab_size, n_pos).astype(np.int32))),
        "sample_lengths": pa.ListArray.from_arrays(row_offsets(np.full(rows, length)),
                                                   pa.array(lengths, field("sample_lengths"))),
        "sample_ids": pa.ListArray.from_arrays(row_offsets(entries_per_row), pa.array(ids, field("sample_ids"))),
        "sample_logprobs": pa.ListArray.from_arrays(row_offsets(entries_per_row), pa.array(logprobs, pa.float16())),
        "sample_counts": pa.ListArray.from_arrays(row_offsets(entries_per_row), pa.array(counts, field("sample_counts"))),
    }).select(schema.names).cast(schema)
    shard = write_shard(out, 0, table)
    atomic_write_json(out / "manifest.json", {
        "format_version": FORMAT_VERSION, "kdcache_version": "bench", "task": "clm", "k": 0,
        "targets": {"kind": "sample", "k": 0, "samples": samples}, "vocab_size": vocab_size,
        "target_vocab_size": vocab_size, "num_labels": None, "id2label": None, "dtype": "fp32", "max_length": length,
        "packing": True, "mlm_probability": None, "mask_copies": None, "seed": seed, "shard_rows": rows,
        "token_type_ids": False, "special_token_ids": {"pad": 0}, "teacher": {"source": "synthetic"},
        "tokenizer": {"sha256": "none", "dir": "tokenizer"}, "data": {"source": "synthetic"}, "complete": True,
        "num_shards": 1, "shards": [shard], "totals": {"rows": rows, "positions": shard["positions"],
                                                      "bytes": shard["bytes"]}, "dump": {}})
    return out


def tiled_real_cache(source: Path, out: Path, rows: int) -> Path:
    """`source`'s rows repeated (new example ids) to at least `rows` rows, same schema and writer."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdcache.cache.files import atomic_write_json
    from kdcache.cache.shards import write_shard

    if (out / "manifest.json").is_file():
        return out
    table = pq.read_table(source / "data")
    copies = -(-rows // table.num_rows)
    tiled = pa.concat_tables([table] * copies).combine_chunks()
    tiled = tiled.set_column(0, "example_id", pa.array(range(tiled.num_rows), pa.int64()))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["shards"] = [write_shard(out, 0, tiled)]
    manifest["num_shards"] = 1
    manifest["totals"] = {"rows": tiled.num_rows, "positions": manifest["shards"][0]["positions"],
                          "bytes": manifest["shards"][0]["bytes"]}
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in (source / "tokenizer").iterdir():
        (out / "tokenizer" / f.name).write_bytes(f.read_bytes())
    atomic_write_json(out / "manifest.json", manifest)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--real-cache", type=Path, default=None, help="a real cache to repeat to --rows rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here (compare_revisions.py)")
    ap.add_argument("--crc-only", action="store_true", help="only the page-CRC verification cost")
    ap.add_argument("--crc-pairs", type=int, default=15, help="with/without-verification pairs per cache")
    ap.add_argument("--checks-only", action="store_true", help="only the read-time semantic checks' cost")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache_loader_"))
    print(f"# {command_line()}")
    print("| cache | rows | positions/row | k | loader, positions/s per worker (wall) | per CPU-second "
          "| Parquet decode alone, per CPU-second | loader / decode time | goal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    caches = []
    for task in ("clm", "mlm"):
        cache = synthetic_cache(work / f"{task}_{args.rows}_{args.k}", rows=args.rows, length=args.length, k=args.k,
                                vocab_size=args.vocab, task=task)
        caches.append((f"synthetic {task} (L={args.length}, V={args.vocab})", cache))
    if args.real_cache:
        caches.append((f"real: {args.real_cache} repeated", tiled_real_cache(args.real_cache, work / "real", args.rows)))
    results = {}
    if args.checks_only:
        caches.append((f"synthetic sample N=16 (L={args.length}, V={args.vocab})",
                       sampled_cache(work / f"sample_{args.rows}", rows=args.rows, length=args.length,
                                     vocab_size=args.vocab)))
        print(f"\nread-time semantic checks, medians of {args.crc_pairs} adjacent pairs:\n")
        print("| cache | loader per CPU-second, with checks | without | cost of the checks | the checks alone, "
              "positions per CPU-second |")
        print("|---|---:|---:|---:|---:|")
        for name, cache in caches:
            positions_per_second(cache, batch_size=args.batch_size)  # warm-up
            with_checks, without, cost = checks_cost(cache, batch_size=args.batch_size, repeats=args.crc_pairs)
            alone = checks_alone(cache, repeats=args.crc_pairs)
            print(f"| {name} | {with_checks:,.0f} | {without:,.0f} | {cost:+.1%} | {alone:,.0f} |", flush=True)
        return
    for name, cache in caches:
        if args.crc_only:
            break
        rates, floors = [], []
        positions_per_second(cache, batch_size=args.batch_size)  # warm-up: page cache, allocator, imports
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            rates.append(positions_per_second(cache, batch_size=args.batch_size))
            floors.append(decode_only(cache, verify=True))  # the loader verifies page CRCs too
        from kdcache.cache.stream import open_cache
        opened = open_cache(cache)
        per_row = opened.manifest["totals"]["positions"] / opened.num_rows
        wall, cpu = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
        floor = statistics.median(floors)
        print(f"| {name} | {opened.num_rows:,} | {per_row:.0f} | {opened.k} | {wall:,.0f} | {cpu:,.0f} | "
              f"{floor:,.0f} | {floor / cpu:.2f} | >= 500,000 |")
        results[name] = {"loader_per_cpu_second": cpu, "decode_per_cpu_second": floor}
    print(f"\npage-CRC verification, medians of {args.crc_pairs} adjacent pairs:\n")
    print("| cache | loader per CPU-second, page CRCs verified | not verified | loader: cost of verifying "
          "| Parquet decode alone: cost of verifying |")
    print("|---|---:|---:|---:|---:|")
    for name, cache in caches:
        positions_per_second(cache, batch_size=args.batch_size)  # warm-up
        cost = crc_cost(cache, batch_size=args.batch_size, repeats=args.crc_pairs)
        verified, unverified, loader_cost = cost["loader"]
        print(f"| {name} | {verified:,.0f} | {unverified:,.0f} | {loader_cost:+.1%} | {cost['decode'][2]:+.1%} |",
              flush=True)
        results.setdefault(name, {})["crc_cost"] = {"loader": loader_cost, "decode": cost["decode"][2]}
    if args.crc_only:
        return
    mlm = caches[1][1]
    rates = [positions_per_second(mlm, batch_size=args.batch_size, soft=False) for _ in range(args.repeats)]
    print(f"\nhard labels only (alpha 0: top-k columns not read), mlm cache: "
          f"{statistics.median(r[0] for r in rates):,.0f} positions/s wall, "
          f"{statistics.median(r[1] for r in rates):,.0f} per CPU-second (medians of {args.repeats})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
