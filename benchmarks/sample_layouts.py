"""The sampled columns' layout: format v2's flat lists against nested ones, side by side.

  flat (format v2)     sample_ids / sample_logprobs / sample_counts as one list<T> per row holding all
                       its positions' entries, plus `sample_lengths` (entries per position), zstd level 3
  nested               the same three as list<list<T>> (one inner list per position), zstd level 3:
                       the layout first written for v2, and the one the top-k columns use

Both are read and turned into what stage two needs — flat values plus per-position entry offsets —
for every row group, one thread. Reported: positions per CPU-second, medians of interleaved rounds.

    python benchmarks/sample_layouts.py --cache CACHE [--repeats 5]
    (CACHE: any sample or top-k+sample cache, e.g. one left by benchmarks/dump_host_path.py)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.schema import DEFAULT_ROW_GROUP_ROWS, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL
from train_common import print_layout_rows

COLUMNS = ["sample_ids", "sample_logprobs", "sample_counts"]


def nested_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list<list<T>> column as (values, offsets per inner list)."""
    inner = column.combine_chunks().values
    return inner.values.to_numpy(zero_copy_only=False), inner.offsets.to_numpy().astype(np.int64)


def write(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
                   row_group_size=DEFAULT_ROW_GROUP_ROWS, use_dictionary=False, write_statistics=False)
    return path


def nest(table: pa.Table) -> pa.Table:
    """Same values, one inner list per position (split by sample_lengths)."""
    lengths = table.column("sample_lengths").combine_chunks()
    inner_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths.values.to_numpy(zero_copy_only=False),
                                                            dtype=np.int64)]).astype(np.int32))
    return pa.table({name: pa.ListArray.from_arrays(lengths.offsets, pa.ListArray.from_arrays(
        inner_offsets, table.column(name).combine_chunks().values)) for name in COLUMNS})


def decode_nested(path: Path) -> float:
    f = pq.ParquetFile(path)
    start = time.process_time()
    for g in range(f.metadata.num_row_groups):
        t = f.read_row_group(g, columns=COLUMNS, use_threads=False)
        for name in COLUMNS:
            nested_values(t.column(name))
    return time.process_time() - start


def decode_flat(path: Path) -> float:
    f = pq.ParquetFile(path)
    start = time.process_time()
    for g in range(f.metadata.num_row_groups):
        t = f.read_row_group(g, columns=COLUMNS + ["sample_lengths"], use_threads=False)
        for name in COLUMNS:
            t.column(name).combine_chunks().values.to_numpy(zero_copy_only=False)
        lengths = t.column("sample_lengths").combine_chunks().values.to_numpy(zero_copy_only=False)
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return time.process_time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcache_sample_layouts_"))
    table = pq.read_table(args.cache / "data", columns=COLUMNS + ["sample_lengths", "positions"]).combine_chunks()
    positions = int(pa.compute.sum(pa.compute.list_value_length(table.column("positions"))).as_py())
    files = {"flat + lengths (format v2)": (write(table.select(COLUMNS + ["sample_lengths"]), work / "flat.parquet"),
                                            decode_flat),
             "nested": (write(nest(table), work / "nested.parquet"), decode_nested)}
    times = {name: [] for name in files}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        for name, (path, decode) in files.items():
            times[name].append(decode(path))
    print(f"# {args.cache}: {table.num_rows:,} rows, {positions:,} positions; medians of {args.repeats}")
    print("| layout | file MiB | positions / CPU-second | ÷ nested |")
    print("|---|---:|---:|---:|")
    print_layout_rows({name: path for name, (path, _) in files.items()}, times, positions, "nested")


if __name__ == "__main__":
    main()
