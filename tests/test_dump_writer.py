"""Several writer threads produce byte-identical shards and report each one once, never concurrently;
the soft-target columns are written byte-stream-split and read back unchanged."""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.cache.schema import TARGET_KINDS, arrow_schema, column_encodings, parquet_path
from kdcache.cache.shards import complete_shards, write_shard
from kdcache.dump.writer import ShardWriter

K, LENGTH, VOCAB = 4, 12, 300


def shard_results(index: int, rows: int = 5):
    rng = np.random.default_rng(index)
    out = []
    for r in range(rows):
        row = SimpleNamespace(example_id=index * rows + r, input_ids=rng.integers(0, VOCAB, LENGTH),
                              positions=np.arange(LENGTH), labels=rng.integers(0, VOCAB, LENGTH).astype(np.int32),
                              token_type_ids=None)
        ids = rng.integers(0, VOCAB, (LENGTH, K))
        logprobs = np.sort(-rng.exponential(2.0, (LENGTH, K)), 1)[:, ::-1].astype(np.float16)
        out.append((row, ids, logprobs))
    return out


def write_all(cache, threads: int, shards: int = 6):
    seen, active, overlap = [], [0], [False]
    lock = threading.Lock()

    def on_written(stats):
        with lock:
            active[0] += 1
            overlap[0] |= active[0] > 1
        time.sleep(0.01)  # widen the window a concurrent call would need
        seen.append(stats["index"])
        with lock:
            active[0] -= 1

    schema = arrow_schema(k=K, vocab_size=VOCAB, max_length=LENGTH)
    writer = ShardWriter(cache, schema, K, on_written=on_written, threads=threads)
    for index in range(shards):
        writer.submit(index, shard_results(index))
    writer.close()
    return seen, overlap[0]


def test_threads_write_identical_shards_each_reported_once(tmp_path):
    seen_one, _ = write_all(tmp_path / "one", threads=1)
    seen_many, overlapped = write_all(tmp_path / "many", threads=3)
    assert sorted(seen_one) == sorted(seen_many) == list(range(6))
    assert not overlapped
    one, many = complete_shards(tmp_path / "one"), complete_shards(tmp_path / "many")
    assert {i: s["sha256"] for i, s in one.items()} == {i: s["sha256"] for i, s in many.items()}


def random_array(typ: pa.DataType, n: int, rng) -> pa.Array:
    """n random values of a cache column type (lists of 1-4 items, nested as the type says)."""
    if pa.types.is_fixed_size_list(typ):
        return pa.FixedSizeListArray.from_arrays(random_array(typ.value_type, n * typ.list_size, rng), typ.list_size)
    if pa.types.is_list(typ):
        offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 5, n))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), random_array(typ.value_type, int(offsets[-1]), rng))
    if pa.types.is_floating(typ):
        return pa.array(-rng.exponential(3.0, n).astype(np.float16), typ)
    return pa.array(rng.integers(0, 200, n), typ)


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_soft_target_columns_are_byte_stream_split_and_read_back_unchanged(tmp_path, kind):
    schema = arrow_schema(k=3, vocab_size=VOCAB, max_length=LENGTH, kind=kind, samples=8, with_token_type_ids=True)
    rng = np.random.default_rng(0)
    table = pa.Table.from_arrays([random_array(f.type, 40, rng) for f in schema], schema=schema)
    stats = write_shard(tmp_path, 0, table, row_group_rows=16)
    meta = pq.ParquetFile(tmp_path / stats["file"]).metadata
    expected = column_encodings(schema)
    assert expected and set(expected) <= {parquet_path(f) for f in schema}
    for g in range(meta.num_row_groups):
        paths = [meta.row_group(g).column(c).path_in_schema for c in range(meta.num_columns)]
        assert paths == [parquet_path(f) for f in schema]  # the rule names pyarrow's real paths
        for c, path in enumerate(paths):
            split = "BYTE_STREAM_SPLIT" in meta.row_group(g).column(c).encodings
            assert split == (path in expected), path
    assert pq.read_table(tmp_path / stats["file"]).equals(table)
    frame = pd.read_parquet(tmp_path / "data")  # FORMAT.md's recipe sees the same values
    for field in schema:
        assert [flat(v) for v in frame[field.name]] == [flat(v) for v in table.column(field.name).to_pylist()]


def flat(value) -> list[float]:
    """A row's (nested) list as one flat list of floats, whether from pandas (arrays) or Arrow (lists)."""
    if isinstance(value, (list, np.ndarray)):
        return [x for item in value for x in flat(item)]
    return [float(value)]
