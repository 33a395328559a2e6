"""Trusting a cache and the commands' inputs (issue 9): every case exits non-zero with one
`error:` line, no traceback, and loses nothing already written; a cache is self-contained.

One small real cache (a tiny Llama teacher, copied so the tests can move it away) serves all
cases; each test that damages a cache works on its own copy.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import shakespeare_lines
from stage2_helpers import cli_ok, run_cli

TINY = ["--layers", 1, "--hidden", 32, "--heads", 2, "--intermediate", 64]
DUMP = ["--targets", "top-k", "--top-k", 4, "--max-length", 32, "--shard-rows", 8, "--no-progress"]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def one_line_error(args, *needles) -> str:
    """Run `kdcache ARGS`: it must exit 2 with exactly one line on stderr, `error: ...`,
    naming every needle. Returns that line."""
    code, _, err = run_cli(args)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_clm):
    root = tmp_path_factory.mktemp("trust")
    teacher = root / "teacher"
    shutil.copytree(tiny_llama_clm, teacher)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(shakespeare_lines(80)) + "\n")
    cache = root / "cache"
    cli_ok(["dump-logits", "--teacher", teacher, "--data", corpus, "--out", cache, *DUMP])
    assert len(json.loads((cache / "manifest.json").read_text())["shards"]) >= 3
    student = root / "student"
    cli_ok(train_args(cache, student))
    return {"root": root, "teacher": teacher, "corpus": corpus, "cache": cache, "student": student}


def train_args(cache, out, *extra):
    return ["train-student", "--cache", cache, "--student", "L2-H128", "--out", out, *TINY,
            "--batch-size", 4, "--max-steps", 1, "--num-workers", 0, "--no-progress", *extra]


def copy_cache(setup, tmp_path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    return cache


def edit_manifest(cache: Path, change) -> None:
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------ 1. bit flips are caught on every read

def test_case1_bit_flip_in_a_shard_is_caught_by_training_and_evaluation(setup, tmp_path):
    cache = copy_cache(setup, tmp_path)
    shard = cache / "data" / "part-00000.parquet"
    original = shard.read_bytes()
    assert pq.ParquetFile(shard).metadata.row_group(0).column(0).num_values > 0
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x04
    shard.write_bytes(bytes(flipped))
    needles = ("data/part-00000.parquet", "corrupt", "part-00000.stats.json", "dump-logits")
    # A DataLoader worker reads it (the default path) and the in-process stream of `evaluate`.
    one_line_error(train_args(cache, tmp_path / "s", "--num-workers", 1), *needles)
    assert not (tmp_path / "s" / "model.safetensors").exists()
    one_line_error(["evaluate", "--model", setup["student"], "--cache", cache], *needles)
    one_line_error(["inspect", cache], *needles)
    # The advice works: delete the shard and its sidecar, re-run the same dump: exactly it comes back.
    shard.unlink()
    (cache / "data" / "_part-00000.stats.json").unlink()
    cli_ok(["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", cache, *DUMP])
    assert shard.read_bytes() == original
    cli_ok(["verify", cache])


def test_case1_no_flipped_bit_in_a_shards_pages_decodes_silently(setup, tmp_path):
    """Every 5th byte of a real shard's page area, one bit flipped: reading it as kdcache does
    either fails or (a bit no decoder uses) gives the very same rows, never different values."""
    from kdcache.cache.shards import READ_ERRORS, open_shard

    good = (setup["cache"] / "data" / "part-00001.parquet").read_bytes()
    expected = pq.read_table(setup["cache"] / "data" / "part-00001.parquet")
    footer = int.from_bytes(good[-8:-4], "little")
    outcomes = {"error": 0, "same": 0}
    path = tmp_path / "flipped.parquet"
    for offset in range(4, len(good) - 8 - footer, 5):
        flipped = bytearray(good)
        flipped[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(flipped))
        try:
            table = open_shard(path).read()
        except READ_ERRORS:
            outcomes["error"] += 1
            continue
        assert table.equals(expected), f"a flip at byte {offset} changed the data silently"
        outcomes["same"] += 1
    assert outcomes["error"] > 0.95 * sum(outcomes.values()), outcomes


def test_case1_shards_carry_page_checksums_and_old_caches_without_them_still_load(setup, tmp_path):
    from kdcache.cache.stream import CacheStream

    cache = copy_cache(setup, tmp_path)
    shard = cache / "data" / "part-00001.parquet"
    table = pq.read_table(shard)
    # Rewrite one shard the way caches were written before page checksums (pyarrow's default).
    pq.write_table(table, shard, compression="zstd", use_dictionary=False, write_statistics=False)

    def update(manifest):
        entry = next(s for s in manifest["shards"] if s["file"] == "data/part-00001.parquet")
        entry["bytes"] = shard.stat().st_size
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    edit_manifest(cache, update)
    rows = sum(batch["num_rows"] for batch in CacheStream(cache, batch_size=4, shuffle=False))
    assert rows == json.loads((cache / "manifest.json").read_text())["totals"]["rows"]
    # The new writer's shards fail on a flipped bit where the old ones decode silently.
    good = (setup["cache"] / "data" / "part-00000.parquet").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x04
    (tmp_path / "x.parquet").write_bytes(bytes(bad))
    # The failure must be the page CRC's (a flip can also break zstd decoding, with or without CRCs).
    with pytest.raises(OSError, match="CRC checksum"):
        pq.ParquetFile(tmp_path / "x.parquet", page_checksum_verification=True).read()


# ------------------------------------------------------------------ 2. manifest paths stay inside the cache

@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_case2_shard_paths_outside_the_cache_are_refused(setup, tmp_path, where):
    cache = copy_cache(setup, tmp_path)
    outside = tmp_path / "outside.parquet"
    shutil.copy(cache / "data" / "part-00000.parquet", outside)
    (cache / "data" / "part-00000.parquet").unlink()
    target = "../outside.parquet" if where == "parent" else str(outside)
    edit_manifest(cache, lambda m: m["shards"][0].update(file=target))
    before = snapshot(tmp_path)
    for args in (train_args(cache, tmp_path / "s"), ["verify", cache], ["inspect", cache],
                 ["evaluate", "--model", setup["student"], "--cache", cache]):
        one_line_error(args, "shards[0].file", target, "outside the cache")
    assert snapshot(tmp_path) == before


def test_case2_tokenizer_dir_outside_the_cache_is_refused(setup, tmp_path):
    cache = copy_cache(setup, tmp_path)
    shutil.copytree(cache / "tokenizer", tmp_path / "other")
    edit_manifest(cache, lambda m: m["tokenizer"].update(dir="../other"))
    one_line_error(train_args(cache, tmp_path / "s"), "tokenizer.dir", "../other", "outside the cache")
    assert not (tmp_path / "s").exists()


def test_case2_the_rule_in_one_place():
    from kdcache.cache.manifest import resolve_inside
    from kdcache.errors import KdcacheError

    root = Path("/some/cache")
    assert resolve_inside(root, "data/part-00000.parquet", "shards[0].file") == root / "data/part-00000.parquet"
    assert resolve_inside(root, "tokenizer/./x/../", "tokenizer.dir") == root / "tokenizer"
    for bad in ("../x", "data/../../x", "/etc/passwd", "", None, 3):
        with pytest.raises(KdcacheError):
            resolve_inside(root, bad, "x")


# ------------------------------------------------------------------ 3. the same cache gives the same student anywhere

def test_case3_preset_student_is_the_same_when_the_teacher_is_gone(setup, tmp_path):
    cache = copy_cache(setup, tmp_path)
    assert (cache / "teacher" / "config.json").is_file()
    with_teacher = json.loads((setup["student"] / "config.json").read_text())
    summary = json.loads((setup["student"] / "train_summary.json").read_text())
    moved = tmp_path / "teacher-moved"
    shutil.move(setup["teacher"], moved)
    try:
        cli_ok(train_args(cache, tmp_path / "s"))
    finally:
        shutil.move(moved, setup["teacher"])
    without = json.loads((tmp_path / "s" / "config.json").read_text())
    assert json.loads((tmp_path / "s" / "train_summary.json").read_text())["num_parameters"] == summary["num_parameters"]
    drop = ("transformers_version", "_name_or_path")
    assert {k: v for k, v in without.items() if k not in drop} == {k: v for k, v in with_teacher.items() if k not in drop}
    # The tiny teacher's own choices survive, not a default Llama's.
    assert without["tie_word_embeddings"] is True and without["max_position_embeddings"] == 256


def test_case3_a_gguf_teachers_derived_config_is_what_the_cache_stores(tmp_path):
    """A GGUF teacher has no config.json: the cache keeps the config transformers derived from it."""
    from transformers import AutoConfig, LlamaConfig

    from kdcache.dump.teacher import Teacher, config_json

    derived = LlamaConfig(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=77, tie_word_embeddings=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')  # must not be taken for a GGUF
    teacher = Teacher(model=None, tokenizer=None, task="clm", source="x.gguf", gguf_file="x.gguf", config=derived,
                      vocab_size=99, target_vocab_size=99, max_positions=77, load_source=str(tmp_path / "model"))
    (tmp_path / "config.json").write_bytes(config_json(teacher))
    stored = AutoConfig.from_pretrained(tmp_path / "config.json").to_dict()
    where = "_name_or_path"  # only where it was read from
    assert {k: v for k, v in stored.items() if k != where} == {k: v for k, v in derived.to_dict().items() if k != where}


# ------------------------------------------------------------------ 4. disk full

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_case4_disk_full_while_writing_a_shard_is_one_line_and_keeps_completed_shards(setup, tmp_path, monkeypatch):
    import pyarrow.parquet

    out = tmp_path / "cache"
    real_write = pyarrow.parquet.write_table
    calls = []

    def write_then_fill_up(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:  # two shards fit, the third does not: half written, then ENOSPC
            Path(where).write_bytes(b"PAR1 half a shard")
            enospc()
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pyarrow.parquet, "write_table", write_then_fill_up)
    args = ["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", out, *DUMP]
    one_line_error(args, "No space left on device", "data/part-00002.parquet", "free space", "re-run")
    kept = snapshot(out)
    assert {"data/part-00000.parquet", "data/part-00001.parquet", "manifest.json"} <= set(kept)
    assert not [name for name in kept if "tmp" in name]  # the half-written shard is gone
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2
    monkeypatch.undo()
    cli_ok(args)  # space freed: resumes, keeping the two shards
    assert all(snapshot(out)[name] == digest for name, digest in kept.items() if name.startswith("data/"))
    assert snapshot(out) | {"manifest.json": None} == snapshot(setup["cache"]) | {"manifest.json": None}


def test_case4_disk_full_while_writing_the_manifest_is_one_line(setup, tmp_path, monkeypatch):
    import os

    out = tmp_path / "cache"
    monkeypatch.setattr(os, "fsync", enospc)
    one_line_error(["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", out, *DUMP],
                   "No space left on device", "manifest.json", "free space")
    assert not [p for p in out.rglob("*") if "tmp" in p.name]


# ------------------------------------------------------------------ 5. --max-length 0 and other zeros

@pytest.mark.parametrize("option,value", [("--max-length", 0), ("--max-length", -3), ("--batch-size", 0),
                                          ("--max-tokens-per-batch", 0)])
def test_case5_zero_or_negative_sizes_are_refused(setup, tmp_path, option, value):
    args = ["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", tmp_path / "c",
            "--targets", "top-k", "--top-k", 4, "--no-progress", option, value]
    one_line_error(args, f"{option} must be", str(value))
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ 6. a student's --out and a cache do not nest

def test_case6_student_out_inside_a_cache_and_cache_inside_out_are_refused(setup, tmp_path):
    cache = copy_cache(setup, tmp_path)
    before = snapshot(tmp_path)
    for out in (cache / "data", cache, cache / "tokenizer" / "sub"):
        one_line_error(train_args(cache, out), "inside the cache", str(cache))
    one_line_error(train_args(cache, tmp_path), "inside --out", str(cache))
    # A cache dumped into another cache's folders would break it the same way.
    one_line_error(["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out",
                    cache / "data" / "nested", *DUMP], "inside the cache", str(cache))
    assert snapshot(tmp_path) == before
    import pandas as pd
    assert len(pd.read_parquet(cache / "data")) == json.loads((cache / "manifest.json").read_text())["totals"]["rows"]


# ------------------------------------------------------------------ 7. --resume needs something to resume

def test_case7_resume_without_a_checkpoint_is_refused(setup, tmp_path):
    one_line_error(train_args(setup["cache"], tmp_path / "typo", "--resume"), "--resume", "no checkpoint",
                   str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    one_line_error(train_args(setup["cache"], tmp_path / "empty", "--resume"), "no checkpoint")
    assert list((tmp_path / "empty").iterdir()) == []
    # A run that was started but stopped before its first checkpoint (what a sweep re-run resumes)
    # has nothing to continue from: --resume starts it again, and says so.
    started = tmp_path / "started"
    started.mkdir()
    (started / "train_summary.json").write_text(json.dumps({"done": False, "steps": 0}))
    code, _, err = run_cli(train_args(setup["cache"], started, "--resume"))
    assert code == 0 and "starting it again from step 0" in err, err
    assert json.loads((started / "train_summary.json").read_text())["done"] is True


# ------------------------------------------------------------------ 8. empty and binary corpora

@pytest.mark.parametrize("name,content,needles", [
    ("empty.jsonl", b"", ("empty.jsonl", "is empty")),
    ("empty.csv", b"", ("empty.csv", "is empty")),
    ("blank.jsonl", b"\n  \n", ("blank.jsonl", "is empty")),
    ("garbage.txt", b"hello\n" + bytes(range(128, 256)) * 8, ("garbage.txt", "not UTF-8 text", "offset 6")),
    ("garbage.jsonl", b'{"text": "ok"}\n' + bytes(range(128, 256)), ("garbage.jsonl", "not UTF-8 text", "offset 15")),
    ("garbage.csv", b"text\nfine\n\x00\x01\x02binary\n", ("garbage.csv", "NUL byte", "offset 10")),
    ("garbage.parquet", b"not a parquet file at all", ("garbage.parquet", "not a Parquet file")),
], ids=lambda value: value if isinstance(value, str) else "")
def test_case8_empty_and_binary_corpora_say_what_is_wrong_with_which_file(setup, tmp_path, name, content, needles):
    data = tmp_path / name
    data.write_bytes(content)
    message = one_line_error(["dump-logits", "--teacher", setup["teacher"], "--data", data, "--out", tmp_path / "c",
                              "--targets", "top-k", "--top-k", 4, "--no-progress"], *needles)
    assert "An error occurred while generating the dataset" not in message and "StopIteration" not in message
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ issue 16, defect 6: flags the target kind ignores

@pytest.mark.parametrize("flags,needles", [
    (["--targets", "top-k", "--top-k", 4, "--samples", 8], ("--samples", "--targets top-k", "drop --samples")),
    (["--targets", "top-k", "--samples", 16], ("--samples", "--targets top-k")),  # even the default value, typed
    (["--targets", "sample", "--top-k", 4], ("--top-k", "--targets sample", "drop --top-k")),
])
def test_i16_flags_the_chosen_target_kind_ignores_are_refused(setup, tmp_path, flags, needles):
    out = tmp_path / "c"
    one_line_error(["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", out,
                    "--max-length", 32, "--no-progress", *flags], *needles)
    assert not out.exists()


def test_i16_flags_the_chosen_target_kind_uses_are_accepted():
    from kdcache.dump.options import DumpOptions, resolve_targets

    # Resolution only (no teacher): these combinations are all fine, and what is left out takes the default.
    for flags, want in (({"targets": "sample", "samples": 8}, ("sample", 0, 8)),
                        ({"targets": "top-k+sample", "top_k": 4, "samples": 8}, ("top-k+sample", 4, 8)),
                        ({"top_k": 4}, ("top-k+sample", 4, 16)), ({"targets": "sample"}, ("sample", 0, 16)),
                        ({}, ("top-k+sample", 8, 16)), ({"targets": "top-k"}, ("top-k", 64, 0))):
        opts = DumpOptions(teacher="t", data="d", out="o", **flags)
        resolve_targets(opts, "clm")
        assert (opts.targets, opts.top_k, opts.samples) == want, flags


def test_defaults_for_classifiers_store_every_class_and_refuse_lm_target_flags():
    from kdcache.dump.options import DumpOptions, resolve_targets
    from kdcache.errors import KdcacheError

    opts = DumpOptions(teacher="t", data="d", out="o")
    resolve_targets(opts, "seq-cls")
    assert opts.targets == "top-k"
    for flags, needle in (({"targets": "sample"}, "--targets sample is for LM teachers"),
                          ({"samples": 8}, "--samples is for LM teachers"), ({"top_k": 2}, "--top-k is for LM teachers")):
        with pytest.raises(KdcacheError, match=needle):
            resolve_targets(DumpOptions(teacher="t", data="d", out="o", **flags), "seq-cls")


# ------------------------------------------------------------------ issue 16, defect 8: sweep's pass-through options

@pytest.mark.parametrize("extra,needles", [
    (["--max-stepz", 3], ("No such option '--max-stepz'", "'--max-steps'", "train-student --help")),
    (["--max-steps", "many"], ("'many' is not a valid integer",)),
    (["--max-steps", 1, "stray"], ("unexpected extra argument", "stray")),
])
def test_i16_sweep_checks_passed_through_options_before_creating_anything(setup, tmp_path, extra, needles):
    runs = tmp_path / "runs"
    one_line_error(["sweep", "--cache", setup["cache"], "--students", "tiny=L2-H128", "--out", runs, "--gpus", "cpu",
                    *extra], *needles)
    assert not runs.exists()


# ------------------------------------------------------------------ issue 16, defect 7: verify's schema message

def rewrite_shard(cache: Path, name: str, table) -> None:
    """Replace one shard with `table`, its manifest entry's size and checksum updated (so only the
    content is wrong)."""
    shard = cache / "data" / name
    pq.write_table(table, shard, compression="zstd", use_dictionary=False, write_page_checksum=True)

    def update(manifest):
        entry = next(s for s in manifest["shards"] if s["file"] == f"data/{name}")
        entry["bytes"] = shard.stat().st_size
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    edit_manifest(cache, update)


def test_i16_verify_names_the_first_column_whose_type_differs_in_one_line(setup, tmp_path):
    import pyarrow as pa

    cache = copy_cache(setup, tmp_path)
    table = pq.read_table(cache / "data" / "part-00001.parquet")
    index = table.schema.get_field_index("topk_logprobs")
    wrong = pa.list_(pa.list_(pa.float32(), 4))
    rewrite_shard(cache, "part-00001.parquet", table.set_column(index, pa.field("topk_logprobs", wrong),
                                                                table.column(index).cast(wrong)))
    message = one_line_error(["verify", cache], "part-00001.parquet", "column topk_logprobs is", "float",
                             "the manifest implies", "halffloat")
    assert "input_ids" not in message  # not the whole schema


def test_i16_schema_difference_names_missing_extra_and_reordered_columns():
    import pyarrow as pa

    from kdcache.cache.verify import schema_difference

    want = pa.schema([("a", pa.int32()), ("b", pa.list_(pa.uint16()))])
    assert schema_difference(pa.schema([("a", pa.int32())]), want) == \
        "schema lacks column b (list<item: uint16>) that the manifest implies"
    assert "column c that the manifest does not imply" in schema_difference(want.append(pa.field("c", pa.int8())), want)
    assert "column a is column 1, the manifest's order has it at 0" in schema_difference(pa.schema([want.field("b"), want.field("a")]), want)
    assert "column a is int64" in schema_difference(pa.schema([("a", pa.int64()), want.field("b")]), want)


# ------------------------------------------------------------------ issue 16, defect 4: a dump whose shards do not read back

def test_i16_dump_fails_when_shards_it_wrote_do_not_read_back(setup, tmp_path, monkeypatch):
    """A store that accepts writes and keeps some of them (here: shard 1's sidecar vanishes, shard 2's
    data file too) left the cache incomplete while the dump exited 0; now it fails naming both."""
    import kdcache.cache.shards as shards

    real_json, real_parquet = shards.atomic_write_json, shards.write_parquet

    def dropping_json(path, obj):
        if Path(str(path)).name != "_part-00001.stats.json":
            real_json(path, obj)

    def dropping_parquet(table, path, **kwargs):
        result = real_parquet(table, path, **kwargs)
        if Path(str(path)).name == "part-00002.parquet":
            Path(path).unlink()
        return result

    monkeypatch.setattr(shards, "atomic_write_json", dropping_json)
    monkeypatch.setattr(shards, "write_parquet", dropping_parquet)
    out = tmp_path / "c"
    args = ["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", out, *DUMP]
    one_line_error(args, "do not read back", f"--out {out}",
                   "data/part-00001.parquet: its sidecar data/_part-00001.stats.json is not there",
                   "data/part-00002.parquet: data/part-00002.parquet is not there", "re-run the same command")
    monkeypatch.undo()
    kept = snapshot(out)["data/part-00000.parquet"]
    cli_ok(args)  # the store behaves again: the same command finishes the cache, keeping what was confirmed
    assert snapshot(out)["data/part-00000.parquet"] == kept
    cli_ok(["verify", out])
