"""What sets the loader's ceiling: decoding the two top-k columns, in the format's layout and in
alternatives, from the same rows written with the same row groups.

  v1 (zstd)            the format: list<fixed_size_list<…, k>> per column, zstd level 3
  v1 uncompressed      the same layout, no compression: what zstd costs
  v1 (zstd), threads   the format read with Arrow's thread pool (inside one loader worker)
  flat list (zstd)     one list<uint16>/list<float16> per row (k × positions values)
  binary blob (zstd)   one binary value per row holding the raw (positions, k) array

Reported: top-k positions decoded per CPU-second (the same columns, all row groups, one
thread unless stated), medians of --repeats interleaved rounds, and the ratio to v1 (zstd).

    python benchmarks/parquet_layouts.py [--cache DIR] [--repeats 5]
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
from train_common import command_line, print_layout_rows, synthetic_cache

COLUMNS = ["topk_ids", "topk_logprobs"]


def flat(column: pa.ChunkedArray) -> pa.Array:
    """list<fixed_size_list<T, k>> -> list<T>, same values, row by row."""
    array = column.combine_chunks()
    k = array.type.value_type.list_size
    return pa.ListArray.from_arrays(pa.array(array.offsets.to_numpy() * k, pa.int32()), array.values.flatten())


def blob(column: pa.ChunkedArray) -> pa.Array:
    """One binary value per row: the row's (positions, k) values as raw bytes."""
    array = column.combine_chunks()
    k = array.type.value_type.list_size
    values = array.values.flatten().to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy().astype(np.int64) * k * values.itemsize
    return pa.BinaryArray.from_buffers(pa.binary(), len(array), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                                     pa.py_buffer(values.tobytes())])


def write(table: pa.Table, path: Path, compression: str | None) -> Path:
    pq.write_table(table, path, compression=compression or "none",
                   compression_level=PARQUET_COMPRESSION_LEVEL if compression else None,
                   row_group_size=DEFAULT_ROW_GROUP_ROWS, use_dictionary=False, write_statistics=False)
    return path


def cpu_seconds(path: Path, threads: bool) -> float:
    f = pq.ParquetFile(path)
    start = time.process_time()
    for g in range(f.metadata.num_row_groups):
        f.read_row_group(g, columns=COLUMNS, use_threads=threads)
    return time.process_time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None,
                    help="a cache to read the rows from [default: a synthetic CLM cache, 4,000 x 128, k 64]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache_layouts_"))
    work.mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet
    cache = args.cache or synthetic_cache(work / "synthetic", rows=4000, length=128, k=64, vocab_size=32000)
    table = pq.read_table(cache / "data", columns=COLUMNS + ["positions"]).combine_chunks()
    positions = int(pa.compute.sum(pa.compute.list_value_length(table.column("positions"))).as_py())
    topk = table.select(COLUMNS)
    files = {
        "v1 (zstd)": (write(topk, work / "v1.parquet", PARQUET_COMPRESSION), False),
        "v1 uncompressed": (write(topk, work / "v1_plain.parquet", None), False),
        "v1 (zstd), threads": (work / "v1.parquet", True),
        "flat list (zstd)": (write(pa.table({c: flat(topk.column(c)) for c in COLUMNS}), work / "flat.parquet",
                                   PARQUET_COMPRESSION), False),
        "binary blob (zstd)": (write(pa.table({c: blob(topk.column(c)) for c in COLUMNS}), work / "blob.parquet",
                                     PARQUET_COMPRESSION), False),
    }
    times = {name: [] for name in files}
    for _ in range(args.repeats):  # interleaved, so machine load hits every layout alike
        for name, (path, threads) in files.items():
            times[name].append(cpu_seconds(path, threads))
    print(f"# {command_line()}")
    print(f"# {cache}: {table.num_rows:,} rows, {positions:,} top-k positions; medians of {args.repeats}")
    print("| layout | file MiB | top-k positions / CPU-second | ÷ v1 (zstd) |")
    print("|---|---:|---:|---:|")
    print_layout_rows({name: path for name, (path, _) in files.items()}, times, positions, "v1 (zstd)")


if __name__ == "__main__":
    main()
