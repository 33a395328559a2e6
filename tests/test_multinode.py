"""Both stages under `torchrun --nnodes 2 --nproc-per-node 2`: two agents on this machine stand in
for two nodes meeting at a c10d rendezvous on 127.0.0.1 (CPU, gloo). Plus training's elastic
resume across a resize: 2 nodes x 2 ranks -> 1 process -> 2 ranks, every row once per epoch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import shakespeare_lines
from dump_helpers import assert_same_rows, dump, manifest, read_rows
from stage2_helpers import cli_error, cli_ok
from torchrun_helpers import torchrun

DUMP = ["--max-length", 32, "--targets", "top-k", "--top-k", 8, "--shard-rows", 8, "--max-tokens-per-batch", 128, "--no-progress"]
TRAIN = ["--student", "L2-H128", "--layers", 1, "--hidden", 32, "--heads", 2, "--intermediate", 64,
         "--device", "cpu", "--log-every", 1, "--no-progress", "--epochs", 1, "--seed", 3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_mlm) -> Path:
    """A one-process dump of a small corpus: the 2-node dump must equal it, and training reads it."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "lines.txt").write_text("\n".join(shakespeare_lines(240)) + "\n")
    dump(tiny_bert_mlm, root / "lines.txt", root / "cache", *DUMP)
    return root / "cache"


def cache_tokens(cache: Path) -> tuple[int, int]:
    """(rows, tokens) of a cache, read from its Parquet files directly."""
    ids = pq.read_table(cache / "data", columns=["input_ids"]).column("input_ids").to_pylist()
    return len(ids), sum(map(len, ids))


def test_two_node_dump_equals_one_process(tmp_path, tiny_bert_mlm, reference):
    out = tmp_path / "cache"
    args = ["-m", "kdcache", "dump-logits", "--teacher", tiny_bert_mlm, "--data", reference.parent / "lines.txt",
            "--out", out, *DUMP]
    launch = torchrun(args, nnodes=2, nproc_per_node=2)
    assert launch.ok, launch.text[-3000:]
    m = manifest(out)
    assert m["complete"] is True and m["dump"]["world_size"] == 4 and m["num_shards"] >= 4
    assert_same_rows(read_rows(out), read_rows(reference))


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def test_two_node_training_reads_every_row_once_per_epoch(tmp_path, reference):
    out = tmp_path / "student"
    args = ["-m", "kdcache", "train-student", "--cache", reference, "--out", out, *TRAIN,
            "--batch-size", 8, "--num-workers", 1]
    launch = torchrun(args, nnodes=2, nproc_per_node=2)
    assert launch.ok, launch.text[-3000:]
    rows, tokens = cache_tokens(reference)
    s = summary(out)
    # One epoch = ceil(rows / (4 processes x 8)) steps, and its tokens are the cache's, each row once.
    assert s["done"] and s["world_size"] == 4 and s["steps"] == math.ceil(rows / 32)
    assert s["tokens"] == tokens


def test_resized_resume_reads_every_row_once(tmp_path, reference):
    # 2 ranks x 2 workers -> 1 process x 3 workers -> 2 ranks x 2 workers again, 16 rows per step
    # throughout (micro-batch x accumulation x processes), one epoch in three sessions.
    out = tmp_path / "student"
    rows, tokens = cache_tokens(reference)
    steps = math.ceil(rows / 16)
    common = ["train-student", "--cache", reference, "--out", out, *TRAIN]
    first = torchrun(["-m", "kdcache", *common, "--batch-size", 8, "--num-workers", 2, "--stop-after-steps", 2],
                     nproc_per_node=2)
    assert first.ok, first.text[-3000:]
    assert summary(out)["steps"] == 2
    # A different global batch cannot continue the same schedule exactly: refused, saying which.
    message = cli_error([*common, "--resume", "--batch-size", 8, "--num-workers", 3])
    assert "global batch" in message and "was 16, this run's is 8" in message
    cli_ok([*common, "--resume", "--batch-size", 8, "--grad-accum", 2, "--num-workers", 3, "--stop-after-steps", 2])
    assert summary(out)["steps"] == 4 and not summary(out)["done"]
    last = torchrun(["-m", "kdcache", *common, "--resume", "--batch-size", 4, "--grad-accum", 2, "--num-workers", 2],
                    nproc_per_node=2)
    assert last.ok, last.text[-3000:]
    s = summary(out)
    assert s["done"] and s["steps"] == steps > 4
    assert s["tokens"] == tokens  # every row of the epoch once across the three geometries
