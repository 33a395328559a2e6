"""The typed manifest view: readers get typed fields with the defaults older caches imply."""
from __future__ import annotations

import pytest

from kdcache.cache.manifest import CacheManifest, view
from kdcache.errors import KdcacheError

V2_SAMPLED = {
    "format_version": 2, "task": "clm", "k": 8, "targets": {"kind": "top-k+sample", "k": 8, "samples": 16},
    "vocab_size": 49152, "target_vocab_size": 49152, "max_length": 256,
    "special_token_ids": {"pad": None, "bos": 1, "eos": 2}, "tokenizer": {"dir": "tok", "sha256": "x"},
    "teacher_config": "teacher/config.json", "token_type_ids": False, "num_labels": None, "id2label": None,
    "teacher": {"model_type": "llama"}, "complete": True, "num_shards": 2,
    "shards": [{"index": 1, "file": "data/part-00001.parquet"}, {"index": 0, "file": "data/part-00000.parquet"}],
}


def test_a_v2_manifest_reads_as_typed_fields():
    m = view(V2_SAMPLED)
    assert (m.task, m.target_kind, m.k, m.samples) == ("clm", "top-k+sample", 8, 16)
    assert (m.vocab_size, m.target_vocab_size, m.max_length) == (49152, 49152, 256)
    assert m.pad_id == 0 and m.special_token_ids["eos"] == 2  # no pad token: id 0 pads
    assert m.tokenizer_dir == "tok" and m.teacher_config == "teacher/config.json"
    assert [s["index"] for s in m.shards] == [0, 1]  # ordered by index whatever the file says
    assert m.raw is V2_SAMPLED and view(m) is m


def test_a_v1_classification_manifest_gets_the_implied_defaults():
    v1 = {"format_version": 1, "task": "seq-cls", "k": 3, "vocab_size": 30522, "target_vocab_size": 3,
          "num_labels": 3, "id2label": {"0": "neg", "2": "pos", "1": "neu"}, "special_token_ids": {"pad": 0}}
    m = view(v1)
    assert isinstance(m, CacheManifest)
    assert (m.target_kind, m.k, m.samples) == ("top-k", 3, 0)  # v1 has no `targets`: a top-k cache
    assert m.tokenizer_dir == "tokenizer" and m.teacher_config is None and not m.complete
    assert m.id2label == {0: "neg", 1: "neu", 2: "pos"} and m.num_labels == 3


def test_a_manifest_without_its_vocabulary_is_a_one_line_error():
    broken = {k: v for k, v in V2_SAMPLED.items() if k != "vocab_size"}
    with pytest.raises(KdcacheError, match=r"cache c: manifest.json lacks or mangles 'vocab_size'"):
        view(broken, "cache c")
