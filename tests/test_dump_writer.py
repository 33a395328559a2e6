"""Several writer threads produce byte-identical shards and report each one once, never concurrently."""
import threading
import time
from types import SimpleNamespace

import numpy as np

from kdcache.cache.schema import arrow_schema
from kdcache.cache.shards import complete_shards
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
