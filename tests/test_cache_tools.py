"""The cache is plain Parquet (pandas, pyarrow.dataset, datasets); inspect and verify report on it truthfully."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dump_helpers import dump, manifest, run_cli
from kdcache.cache.files import atomic_write_json
from kdcache.cache.shards import write_shard


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_llama_clm, shakespeare_txt):
    out = tmp_path_factory.mktemp("tools") / "cache"
    dump(tiny_llama_clm, shakespeare_txt, out, "--max-length", 64, "--targets", "top-k", "--top-k", 16, "--shard-rows", 20)
    return out


def test_reads_with_pandas_pyarrow_and_datasets(cache):
    import datasets
    import pandas as pd
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    m = manifest(cache)
    df = pd.read_parquet(cache / "data")
    assert len(df) == m["totals"]["rows"] and list(df.columns) == [
        "example_id", "input_ids", "positions", "topk_ids", "topk_logprobs", "labels"]
    table = pads.dataset(cache / "data", format="parquet").to_table()
    assert table.num_rows == m["totals"]["rows"]
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 16))
    assert table.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 16))
    ds = datasets.load_dataset("parquet", data_files=str(cache / "data" / "*.parquet"), split="train")
    assert len(ds) == m["totals"]["rows"]
    assert sorted(ds["example_id"]) == sorted(df["example_id"].tolist()) == list(range(len(df)))
    row = ds[0]
    assert len(row["topk_ids"]) == len(row["positions"]) == len(row["labels"]) and len(row["topk_ids"][0]) == 16
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    assert len(tok) == m["vocab_size"]


def test_inspect_reports_the_right_numbers(cache, capsys):
    code, out, _ = run_cli(["inspect", cache, "--json"], capsys)
    assert code == 0
    stats = json.loads(out)
    table = pq.read_table(cache / "data")
    lp = pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy().astype(np.float64).reshape(-1, 16)
    ids = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy().reshape(-1, 16)
    labels = pc.list_flatten(table.column("labels")).to_numpy()
    known = labels >= 0
    assert stats["rows"] == table.num_rows
    assert stats["positions"] == len(lp) == len(labels)
    assert stats["k"] == 16 and stats["task"] == "clm"
    assert stats["bytes"] == sum(p.stat().st_size for p in (cache / "data").glob("*.parquet"))
    assert stats["bytes_per_position"] == pytest.approx(stats["bytes"] / len(lp), rel=1e-3)
    assert stats["mean_topk_mass"] == pytest.approx(np.exp(lp).sum(axis=1).mean(), rel=1e-4)
    assert stats["teacher_top1_accuracy"] == pytest.approx((ids[known, 0] == labels[known]).mean(), abs=1e-6)
    assert stats["labelled_positions"] == int(known.sum()) == len(labels) - 1  # only the corpus end is unknown
    code, text, _ = run_cli(["inspect", cache], capsys)
    assert code == 0 and "bytes per position" in text and "teacher top1 accuracy" in text


def test_verify_accepts_a_good_cache(cache, capsys):
    code, out, _ = run_cli(["verify", cache], capsys)
    assert code == 0 and f"ok: {manifest(cache)['num_shards']} shards" in out


def test_verify_names_a_corrupted_shard(cache, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = bad / "data" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", bad], capsys)
    assert code == 2 and "part-00001.parquet" in err and "sha256" in err and "Traceback" not in err


def test_verify_checks_contents_not_only_checksums(cache, tmp_path, capsys):
    """A shard rewritten with a positive log-prob (checksums updated) is still caught."""
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    m = manifest(bad)
    table = pq.read_table(bad / "data" / "part-00002.parquet")
    lp = table.column("topk_logprobs").to_pylist()
    lp[3][0][0] = 0.5
    table = table.set_column(table.schema.get_field_index("topk_logprobs"), table.schema.field("topk_logprobs"),
                             pa.array(lp, table.schema.field("topk_logprobs").type))
    m["shards"][2] = write_shard(bad, 2, table)
    atomic_write_json(bad / "manifest.json", m)
    code, _, err = run_cli(["verify", bad], capsys)
    assert code == 2 and "part-00002.parquet" in err and "> 0" in err


def test_verify_refuses_an_incomplete_cache(cache, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    m = manifest(partial)
    m["shards"] = m["shards"][:-1]
    m["complete"] = False
    atomic_write_json(partial / "manifest.json", m)
    code, _, err = run_cli(["verify", partial], capsys)
    assert code == 2 and "incomplete" in err
    code, _, err = run_cli(["verify", tmp_path / "nowhere"], capsys)
    assert code == 2 and "does not exist" in err
