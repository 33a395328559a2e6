"""--data: local files of every supported kind, globs and directories load as the user wrote them."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.dump.corpus import load_corpus
from kdcache.errors import KdcacheError

REPO = Path(__file__).resolve().parent.parent


def test_tsv_keeps_quotes_as_text_and_every_row():
    lines = (REPO / "data" / "sms_spam.tsv").read_text().splitlines()[1:]
    corpus = load_corpus(str(REPO / "data" / "sms_spam.tsv"), text_column="SMS", label_column="Label")
    assert corpus.dataset["text"] == [line.split("\t", 1)[1] for line in lines]  # 55 messages contain quotes
    assert corpus.dataset["label"] == [line.split("\t", 1)[0] for line in lines]
    assert corpus.description["num_source_examples"] == len(lines) == 5574


def test_txt_glob_directory_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.txt").write_text("third line\n")
    by_glob = load_corpus(str(tmp_path / "*.txt"))
    assert by_glob.dataset["text"] == ["first line", "second line", "third line"]
    assert by_glob.dataset["source_index"] == [0, 2, 3]  # the blank line is dropped, ids still trace back
    assert load_corpus(str(tmp_path)).dataset["text"] == by_glob.dataset["text"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "y": i}) + "\n" for i, t in enumerate("xyz")))
    js = load_corpus(str(tmp_path / "d.jsonl"), text_column="body", label_column="y", limit=2)
    assert js.dataset["text"] == ["x", "y"] and js.dataset["label"] == [0, 1] and js.description["limit"] == 2
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "e.parquet")
    assert load_corpus(str(tmp_path / "e.parquet")).dataset["text"] == ["p", "q"]
    with pytest.raises(KdcacheError, match="mixes file types"):
        load_corpus(str(tmp_path / "*"))
