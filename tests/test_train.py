"""train-student end to end on real `kdcache dump-logits` caches of tiny teachers (CPU)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import shakespeare_lines, single_thread_env
from kdcache.cache.stream import open_cache
from kdcache.train.evaluate import evaluate
from kdcache.train.students import Sizes, build_student, init_from_teacher, plan_student
from stage2_helpers import cli_error, cli_ok, run_cli, sharp_bert_mlm

TINY = ["--layers", 1, "--hidden", 32, "--heads", 2, "--intermediate", 64]


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, wordpiece_tokenizer):
    """A confident tiny BERT teacher and two real caches of it: train (600 lines), held-out (100)."""
    root = tmp_path_factory.mktemp("train_mlm")
    teacher = sharp_bert_mlm(root / "teacher", wordpiece_tokenizer)
    lines = shakespeare_lines(700)
    (root / "train.txt").write_text("\n".join(lines[:600]) + "\n")
    (root / "held.txt").write_text("\n".join(lines[600:]) + "\n")
    for name in ("train", "held"):
        cli_ok(["dump-logits", "--teacher", teacher, "--data", root / f"{name}.txt", "--out", root / name,
                "--targets", "top-k", "--top-k", 8, "--max-length", 32, "--shard-rows", 96, "--no-progress"])
    return {"root": root, "teacher": teacher, "train": root / "train", "held": root / "held"}


def train_args(cache, out, *extra):
    return ["train-student", "--cache", cache, "--student", "L2-H128", "--out", out, *TINY,
            "--batch-size", 16, "--num-workers", 0, *extra]


def test_student_learns_to_agree_with_its_teacher(mlm, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "student"
    cli_ok(train_args(mlm["train"], out, "--max-steps", 150, "--lr", "1e-2", "--alpha", 1, "--log-every", 50))
    trained = evaluate(out, mlm["held"])
    cache = open_cache(mlm["train"])
    plan = plan_student("L2-H128", cache.manifest, cache_tokenizer_dir=cache.tokenizer_dir, sizes=Sizes(1, 32, 2, 64))
    torch.manual_seed(0)
    build_student(plan, "mlm").save_pretrained(tmp_path / "untrained")
    untrained = evaluate(tmp_path / "untrained", mlm["held"])
    assert trained["top1_agreement"] > 0.5 and trained["top1_agreement"] > untrained["top1_agreement"] + 0.4
    assert trained["kl"] < 0.5 * untrained["kl"]
    # A plain transformers model with the cache's tokenizer, and the promised run records.
    assert AutoModelForMaskedLM.from_pretrained(out).config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(out)) == cache.manifest["vocab_size"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["done"] and summary["steps"] == 150 and summary["tokens"] > 0 and summary["num_parameters"] > 0
    assert summary["cache"] == str(mlm["train"].resolve()) and summary["student"]["spec"] == "L2-H128"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [50, 100, 150]
    assert set(metrics[0]) >= {"step", "loss", "kd_loss", "hard_loss", "lr", "tokens_per_second"}
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert not (out / "checkpoint").exists()


def test_resume_continues_exactly(mlm, tmp_path):
    # Dropout on, 2 loader workers, accumulation, epochs crossing: the resumed run must still be identical.
    common = ["--max-steps", 12, "--grad-accum", 2, "--batch-size", 16, "--num-workers", 2, "--log-every", 2,
              "--seed", 5]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli_ok(train_args(mlm["train"], straight, *common))
    stopped = cli_ok(train_args(mlm["train"], split, *common, "--stop-after-steps", 7, "--json"))
    assert json.loads(stopped)["steps"] == 7 and (split / "checkpoint" / "model.safetensors").is_file()
    assert not (split / "model.safetensors").exists()
    cli_ok(train_args(mlm["train"], split, *common, "--resume"))
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda p: [(m["step"], m["loss"]) for m in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]
    assert losses(straight) == losses(split)
    # 12 steps x 2 x 16 rows > one epoch of this cache: the run crossed an epoch boundary.
    assert json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] >= 1


def test_existing_run_is_never_overwritten(mlm, tmp_path):
    out = tmp_path / "run"
    cli_ok(train_args(mlm["train"], out, "--max-steps", 4, "--stop-after-steps", 2))
    message = cli_error(train_args(mlm["train"], out, "--max-steps", 4))
    assert "--resume" in message and (out / "checkpoint").is_dir()
    message = cli_error(train_args(mlm["train"], out, "--max-steps", 4, "--resume", "--seed", 9))
    assert "seed" in message


def test_hard_labels_only_and_online_teacher_modes(mlm, tmp_path):
    code, _, err = run_cli(train_args(mlm["train"], tmp_path / "hard", "--max-steps", 3, "--alpha", 0))
    assert code == 0 and "tokens/s" in err and "%|" in err  # the progress bar, by default
    cli_ok(train_args(mlm["train"], tmp_path / "online", "--max-steps", 3, "--online-teacher", mlm["teacher"],
                      "--tail", "bucket", "--temperature", 2))
    code, _, err = run_cli(train_args(mlm["train"], tmp_path / "quiet", "--max-steps", 3, "--no-progress"))
    assert code == 0 and "%|" not in err and (tmp_path / "quiet" / "metrics.jsonl").is_file()
    for name in ("hard", "online"):
        assert json.loads((tmp_path / name / "train_summary.json").read_text())["done"]
    assert json.loads((tmp_path / "online" / "train_summary.json").read_text())["online_teacher"]


def test_init_from_teacher_copies_embeddings_and_spaced_layers(mlm):
    cache = open_cache(mlm["train"])
    plan = plan_student("L2-H128", cache.manifest, cache_tokenizer_dir=cache.tokenizer_dir, sizes=Sizes(1, 32, 2, 64))
    student = build_student(plan, "mlm")
    assert init_from_teacher(student, "mlm", cache.manifest) == [0]
    from transformers import AutoModelForMaskedLM
    teacher = AutoModelForMaskedLM.from_pretrained(mlm["teacher"]).state_dict()
    mine = student.state_dict()
    assert torch.equal(mine["bert.embeddings.word_embeddings.weight"], teacher["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(mine["bert.encoder.layer.0.output.dense.weight"], teacher["bert.encoder.layer.0.output.dense.weight"])
    assert not torch.equal(mine["bert.encoder.layer.0.output.dense.weight"], teacher["bert.encoder.layer.1.output.dense.weight"])


@pytest.mark.parametrize("task", ["clm", "seq-cls"])
def test_other_tasks_train_and_load(task, tmp_path, tiny_llama_clm, tiny_bert_cls, shakespeare_txt, sms_csv):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    teacher, data, extra = ((tiny_llama_clm, shakespeare_txt, ["--targets", "top-k", "--top-k", 16]) if task == "clm"
                            else (tiny_bert_cls, sms_csv, ["--label-column", "label"]))
    cache = tmp_path / "cache"
    cli_ok(["dump-logits", "--teacher", teacher, "--data", data, "--out", cache, "--max-length", 32, "--limit", 80,
            "--no-progress", *extra])
    out = tmp_path / "student"
    cli_ok(train_args(cache, out, "--max-steps", 3, "--init-from-teacher", "--layers", 1))
    auto = AutoModelForCausalLM if task == "clm" else AutoModelForSequenceClassification
    model = auto.from_pretrained(out)
    assert model.config.vocab_size == open_cache(cache).manifest["vocab_size"]
    if task == "seq-cls":
        assert model.config.id2label == {0: "ham", 1: "spam"}
    metrics = evaluate(out, cache)
    assert 0 <= metrics["top1_agreement"] <= 1 and metrics["positions"] > 0


def test_bad_inputs_give_one_line_errors(mlm, tmp_path):
    train = mlm["train"]
    # Unknown preset.
    assert "L4-H256" in cli_error(["train-student", "--cache", train, "--student", "L3-H100", "--out", tmp_path / "a"])
    # A config whose vocabulary is not the cache's.
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"model_type": "bert", "vocab_size": 123, "hidden_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}))
    assert "vocabulary of 123" in cli_error(["train-student", "--cache", train, "--student", config, "--out", tmp_path / "b"])
    # Hidden size differs from the teacher's with --init-from-teacher.
    message = cli_error(["train-student", "--cache", train, "--student", "L2-H128", "--init-from-teacher",
                         "--out", tmp_path / "c"])
    assert "hidden size" in message and "128" in message and "32" in message
    # Missing and corrupt shards are named.
    broken = tmp_path / "broken"
    shutil.copytree(train, broken)
    shard = broken / "data" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "part-00001.parquet" in cli_error(train_args(broken, tmp_path / "d", "--max-steps", 1))
    shard.unlink()
    assert "part-00001.parquet" in cli_error(train_args(broken, tmp_path / "e", "--max-steps", 1))
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    # A model of another vocabulary: refused as a student to continue from, and for evaluation.
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(vocab_size=123, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "other")
    assert "vocabulary of 123" in cli_error(["train-student", "--cache", train, "--student", tmp_path / "other",
                                             "--out", tmp_path / "f", "--max-steps", 1])
    assert "same tokenizer" in cli_error(["evaluate", "--model", tmp_path / "other", "--cache", train])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu(mlm, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "kdcache", *map(str, train_args(mlm["train"], out, "--epochs", 1, "--save-every", 3,
                                                "--num-workers", 1, "--device", "cpu"))]
    result = subprocess.run(cmd, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    # --epochs 1 became ceil(rows / (2 processes x 16)) steps, the same on both ranks.
    from kdcache.cache.stream import CacheStream
    expected = CacheStream(mlm["train"], batch_size=16, world_size=2, num_workers=1).steps_per_epoch()
    assert summary["done"] and summary["world_size"] == 2 and summary["steps"] == expected > 3
    from transformers import AutoModelForMaskedLM
    assert AutoModelForMaskedLM.from_pretrained(out).config.vocab_size == 400
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]
