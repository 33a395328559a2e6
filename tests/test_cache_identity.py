"""Which manifest differences make a re-run refuse: content, not location."""
from kdcache.cache.manifest import identity_differences


def _manifest(**over):
    base = {
        "format_version": 1, "task": "clm", "k": 8, "vocab_size": 100, "target_vocab_size": 100,
        "dtype": "fp32", "max_length": 64, "packing": True, "mlm_probability": None, "mask_copies": None,
        "seed": 0, "shard_rows": 16,
        "teacher": {"source": "/a/teacher", "gguf_file": None, "config_sha256": "c1", "weights_sha256": "w1"},
        "tokenizer": {"sha256": "t1", "dir": "tokenizer"},
        "data": {"source": "/a/corpus.txt", "split": "train", "content_sha256": "d1"},
    }
    for key, value in over.items():
        base[key] = value
    return base


def test_moved_teacher_and_corpus_with_same_checksums_match():
    moved = _manifest(teacher={"source": "/b/teacher", "gguf_file": None, "config_sha256": "c1", "weights_sha256": "w1"},
                      data={"source": "/b/corpus.txt", "split": "train", "content_sha256": "d1"})
    assert identity_differences(_manifest(), moved) == []


def test_changed_weights_data_or_k_are_named():
    other = _manifest(k=16, teacher={"source": "/a/teacher", "gguf_file": None, "config_sha256": "c1", "weights_sha256": "w2"},
                      data={"source": "/a/corpus.txt", "split": "train", "content_sha256": "d2"})
    assert identity_differences(_manifest(), other) == ["k", "teacher.weights_sha256", "data.content_sha256"]


def test_paths_count_when_there_is_no_checksum():
    a = _manifest(data={"source": "imdb", "split": "train", "content_sha256": None})
    b = _manifest(data={"source": "ag_news", "split": "train", "content_sha256": None})
    assert identity_differences(a, b) == ["data.source"]
