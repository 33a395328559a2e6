"""Cached top-k targets equal an independent, unbatched teacher forward, for every task."""
from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from dump_helpers import dump, manifest, read_rows

# Stored log-probs are float16: about 3 significant digits.
RTOL, ATOL = 2e-3, 2e-3


def direct_logprobs(model, input_ids, token_type_ids=None):
    """Full-vocabulary log-softmax of one row, run alone (no padding, no batching)."""
    kwargs = {"input_ids": torch.tensor([input_ids])}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([token_type_ids])
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_targets(row, logprobs_at_positions, k):
    ids, stored = row["topk_ids"], row["topk_logprobs"]
    assert ids.shape == (len(row["positions"]), k)
    # sorted by descending teacher probability
    assert (np.diff(stored, axis=1) <= 0).all()
    # the stored values are the teacher's log-probs at the stored ids...
    direct_at_ids = np.take_along_axis(logprobs_at_positions, ids, axis=1)
    np.testing.assert_allclose(stored, direct_at_ids, rtol=RTOL, atol=ATOL)
    # ...and those ids are the top k (compare values, so exact ties cannot make this flaky)
    direct_topk = -np.sort(-logprobs_at_positions, axis=1)[:, :k]
    np.testing.assert_allclose(stored, direct_topk, rtol=RTOL, atol=ATOL)


def token_stream(tokenizer, path):
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [t for line in lines for t in tokenizer(line)["input_ids"]]


@pytest.fixture(scope="module")
def mlm_cache(tmp_path_factory, tiny_bert_mlm, shakespeare_txt):
    out = tmp_path_factory.mktemp("mlm") / "cache"
    dump(tiny_bert_mlm, shakespeare_txt, out, "--max-length", 32, "--targets", "top-k", "--top-k", 16, "--shard-rows", 40,
         "--max-tokens-per-batch", 256)
    return out


def test_mlm_targets_match_direct_forward(mlm_cache, tiny_bert_mlm, shakespeare_txt):
    m = manifest(mlm_cache)
    assert (m["task"], m["k"], m["packing"], m["mask_copies"], m["complete"]) == ("mlm", 16, True, 1, True)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_mlm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_mlm)
    stream = token_stream(tok, shakespeare_txt)
    rows = read_rows(mlm_cache)
    assert len(rows) == -(-len(stream) // 32) == m["totals"]["rows"]
    for row in rows:
        block = stream[row["example_id"] * 32:(row["example_id"] + 1) * 32]
        ids, pos = np.array(row["input_ids"]), np.array(row["positions"])
        # labels are the original tokens; unmasked positions are untouched
        assert row["labels"] == [block[p] for p in pos]
        untouched = np.setdiff1d(np.arange(len(block)), pos)
        assert (ids[untouched] == np.array(block)[untouched]).all()
        assert len(pos) > 0 and (np.diff(pos) > 0).all()
        check_targets(row, direct_logprobs(model, row["input_ids"])[pos], 16)


def test_clm_targets_and_labels(tmp_path, tiny_llama_clm, shakespeare_txt):
    out = tmp_path / "cache"
    dump(tiny_llama_clm, shakespeare_txt, out, "--max-length", 48, "--targets", "top-k", "--top-k", 8, "--shard-rows", 25, "--batch-size", 8)
    m = manifest(out)
    assert (m["task"], m["packing"], m["mlm_probability"]) == ("clm", True, None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_clm).eval()
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")  # the saved tokenizer is the teacher's
    stream = token_stream(tok, shakespeare_txt)
    rows = read_rows(out)
    assert [r["example_id"] for r in rows] == list(range(len(rows)))
    for row in rows:
        start = row["example_id"] * 48
        assert row["input_ids"] == stream[start:start + 48]
        assert row["positions"] == list(range(len(row["input_ids"])))
        nxt = stream[start + 1:start + 1 + len(row["input_ids"])]
        assert row["labels"] == nxt + [-1] * (len(row["input_ids"]) - len(nxt))  # -1 only at the corpus end
        check_targets(row, direct_logprobs(model, row["input_ids"]), 8)
    assert rows[-1]["labels"][-1] == -1 and rows[0]["labels"][-1] == stream[48]


def test_clm_without_packing_truncates_each_example(tmp_path, tiny_llama_clm, shakespeare_txt):
    out = tmp_path / "cache"
    dump(tiny_llama_clm, shakespeare_txt, out, "--max-length", 12, "--targets", "top-k", "--top-k", 4, "--no-packing", "--limit", 40)
    tok = AutoTokenizer.from_pretrained(tiny_llama_clm)
    lines = shakespeare_txt.read_text().splitlines()[:40]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_clm).eval()
    rows = read_rows(out)
    assert [r["example_id"] for r in rows] == list(range(40))
    assert manifest(out)["packing"] is False
    for row in rows:
        expected = tok(lines[row["example_id"]], truncation=True, max_length=12)["input_ids"]
        assert row["input_ids"] == expected
        assert row["labels"] == expected[1:] + [-1]
        check_targets(row, direct_logprobs(model, expected), 4)


def test_seq_cls_targets_labels_and_types(tmp_path, tiny_bert_cls, sms_csv):
    out = tmp_path / "cache"
    dump(tiny_bert_cls, sms_csv, out, "--label-column", "label", "--max-length", 40, "--shard-rows", 64)
    m = manifest(out)
    assert (m["task"], m["k"], m["num_labels"], m["id2label"], m["packing"]) == ("seq-cls", 2, 2, {"0": "ham", "1": "spam"}, None)
    schema = pq.read_schema(out / "data" / "part-00000.parquet")
    assert schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint8(), 2))
    assert schema.field("input_ids").type == pa.list_(pa.uint16())  # vocab 400 > 255
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_cls)
    with open(sms_csv, newline="") as f:
        source = list(csv.DictReader(f))
    rows = read_rows(out)
    assert len(rows) == len(source) == m["totals"]["rows"]
    for row in rows:
        src = source[row["example_id"]]
        assert row["input_ids"] == tok(src["text"], truncation=True, max_length=40)["input_ids"]
        assert row["positions"] == [0] and row["labels"] == [int(src["label"])]
        check_targets(row, direct_logprobs(model, row["input_ids"])[None, :], 2)


def test_pair_classification_writes_token_type_ids(tmp_path, tiny_bert_cls, sms_csv):
    pairs = tmp_path / "pairs.jsonl"
    with open(sms_csv, newline="") as f:
        source = list(csv.DictReader(f))[:30]
    import json
    pairs.write_text("".join(json.dumps({"a": s["text"][:60], "b": s["text"][-40:], "y": ["ham", "spam"][int(s["label"])]}) + "\n"
                             for s in source))
    out = tmp_path / "cache"
    dump(tiny_bert_cls, pairs, out, "--text-column", "a", "--text-pair-column", "b", "--label-column", "y", "--max-length", 48)
    assert manifest(out)["token_type_ids"] is True
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_cls)
    for row in read_rows(out):
        src = source[row["example_id"]]
        enc = tok(src["text"][:60], src["text"][-40:], truncation=True, max_length=48)
        assert row["input_ids"] == enc["input_ids"] and row["token_type_ids"] == enc["token_type_ids"]
        assert 1 in row["token_type_ids"] and row["labels"] == [int(src["label"])]  # names mapped via label2id
        check_targets(row, direct_logprobs(model, enc["input_ids"], enc["token_type_ids"])[None, :], 2)

    # Stage two reads the pairs back: each batch row carries its own token types, padded with 0.
    from kdcache.cache.stream import CacheStream
    rows = {r["example_id"]: r for r in read_rows(out)}
    seen = 0
    for batch in CacheStream(out, batch_size=7, shuffle_buffer=10, seed=3):
        for b, example in enumerate(batch["example_id"].tolist()):
            n = len(rows[example]["input_ids"])
            assert batch["token_type_ids"][b, :n].tolist() == rows[example]["token_type_ids"]
            assert batch["token_type_ids"][b, n:].eq(0).all() and batch["input_ids"][b, :n].tolist() == rows[example]["input_ids"]
            seen += 1
    assert seen == len(rows)
