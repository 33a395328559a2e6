"""Every bad input gives one `error: ...` line, exit code 2, no traceback, and loses nothing already written."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dump_helpers import dump, manifest


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, stderr
    # progress bars (loading, tokenizing) may precede it; the error itself is one last line
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def existing(tmp_path_factory, tiny_bert_mlm, shakespeare_txt):
    """A finished cache that the failing runs below must leave byte-for-byte alone."""
    out = tmp_path_factory.mktemp("existing") / "cache"
    dump(tiny_bert_mlm, shakespeare_txt, out, "--max-length", 32, "--targets", "top-k", "--top-k", 4, "--limit", 60, "--shard-rows", 10)
    return out


def failing(capsys, teacher, data, out, *extra):
    code, _, stderr = dump(teacher, data, out, *extra, capsys=capsys, check=False)
    return code, stderr


def test_missing_text_column(capsys, tiny_bert_cls, sms_csv, tmp_path):
    code, err = failing(capsys, tiny_bert_cls, sms_csv, tmp_path / "c", "--text-column", "body")
    assert_one_line_error(code, err, "'body'", "text, label", "--text-column")
    assert not (tmp_path / "c").exists()


def test_missing_label_column(capsys, tiny_bert_cls, sms_csv, tmp_path):
    code, err = failing(capsys, tiny_bert_cls, sms_csv, tmp_path / "c", "--label-column", "gold")
    assert_one_line_error(code, err, "'gold'", "--label-column")


def test_empty_corpus(capsys, tiny_bert_mlm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    code, err = failing(capsys, tiny_bert_mlm, empty, tmp_path / "c")
    assert_one_line_error(code, err, "no non-empty text", str(empty))
    code, err = failing(capsys, tiny_bert_mlm, tmp_path / "nothing-*.txt", tmp_path / "c")
    assert_one_line_error(code, err, "matches no")


def test_unknown_teacher_path(capsys, shakespeare_txt, tmp_path):
    code, err = failing(capsys, tmp_path / "no-such-teacher", shakespeare_txt, tmp_path / "c")
    assert_one_line_error(code, err, "no-such-teacher", "not found")


def test_top_k_beyond_vocabulary(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path):
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path / "c", "--targets", "top-k", "--top-k", 401)
    assert_one_line_error(code, err, "--top-k 401", "400")


def test_max_length_beyond_teacher_limit(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path):
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path / "c", "--max-length", 129)
    assert_one_line_error(code, err, "--max-length 129", "128")


def test_different_cache_in_out_dir_is_refused_and_kept(capsys, existing, tiny_bert_mlm, tiny_llama_clm, shakespeare_txt):
    before = snapshot(existing)
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, existing, "--max-length", 32, "--targets", "top-k", "--top-k", 8, "--limit", 60,
                        "--shard-rows", 10)
    assert_one_line_error(code, err, "different cache", "k", "--overwrite")
    code, err = failing(capsys, tiny_llama_clm, shakespeare_txt, existing, "--max-length", 32, "--targets", "top-k", "--top-k", 4, "--limit", 60,
                        "--shard-rows", 10)
    assert_one_line_error(code, err, "teacher.", "tokenizer.sha256")
    # --overwrite with an invalid input must not delete the old cache either
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, existing, "--text-column", "nope", "--overwrite")
    assert_one_line_error(code, err, "'nope'")
    assert snapshot(existing) == before


def test_non_cache_directory_is_refused(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path / "c", "--overwrite")
    assert_one_line_error(code, err, "not a kdcache cache")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_unwritable_output(capsys, tiny_bert_mlm, shakespeare_txt, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = failing(capsys, tiny_bert_mlm, shakespeare_txt, blocker / "cache", "--limit", 10)
    assert_one_line_error(code, err, "not writable", "a-file")
    assert blocker.read_text() == "x"


def test_nan_teacher_outputs_name_the_example_ids(capsys, tiny_bert_cls, sms_csv, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_bert_cls, poisoned)
    tok = AutoTokenizer.from_pretrained(tiny_bert_cls)
    token = tok.convert_tokens_to_ids("for")  # in about a fifth of the SMS messages
    assert token != tok.unk_token_id
    weights = load_file(poisoned / "model.safetensors")
    name = next(n for n in weights if n.endswith("word_embeddings.weight"))
    weights[name][token] = float("inf")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "c"
    code, err = failing(capsys, poisoned, sms_csv, out, "--label-column", "label", "--max-length", 40, "--shard-rows", 50)
    assert_one_line_error(code, err, "NaN/inf", "example ids", "--dtype")
    named = [int(x) for x in err.split("example ids ")[1].split(" (")[0].replace(" ...", "").split(", ")]
    import csv
    with open(sms_csv, newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    assert named and all(token in tok(texts[i], truncation=True, max_length=40)["input_ids"] for i in named)
    # shards before the bad one are complete and kept; a fixed teacher resumes from there
    m = manifest(out)
    assert m["complete"] is False
    kept = {s["index"] for s in m["shards"]}
    assert min(named) // 50 not in kept
    assert all(i < min(named) // 50 for i in kept)
