"""Distilling from your own trainer: examples/own_loop.py, the transformers Trainer integration
(examples/hf_trainer.py, KDTrainer) and `kdcache train-student` take the same steps; the Trainer
resumes exactly after a kill and reads every row once per epoch under torchrun; the README's
snippets run."""
from __future__ import annotations

import json
import re
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, single_thread_env
from kdcache.errors import KdcacheError
from stage2_helpers import cli_ok
from torchrun_helpers import torchrun

STEPS = 24  # > one epoch of these caches (77 rows / 4 per step): the epoch boundary is crossed too
FLAGS = ["--max-steps", STEPS, "--batch-size", 4, "--lr", "1e-3", "--seed", 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_clm, shakespeare_txt):
    """A student directory (1-layer Llama with attention dropout, so the RNG streams must match
    too) and a top-k and a sampled cache of the fixture teacher."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("own_trainer")
    teacher = LlamaForCausalLM.from_pretrained(tiny_llama_clm)
    config = teacher.config
    config.num_hidden_layers, config.attention_dropout = 1, 0.1
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(root / "student")
    caches = {}
    for kind, args in {"top-k": ["--top-k", 8], "sample": ["--targets", "sample", "--samples", 16]}.items():
        caches[kind] = root / kind
        cli_ok(["dump-logits", "--teacher", tiny_llama_clm, "--data", shakespeare_txt, "--out", caches[kind],
                "--max-length", 32, "--limit", 120, "--no-progress", *args])
    return {"root": root, "student": root / "student", "caches": caches}


def run_example(name: str, argv: list) -> None:
    """An example script in this process, as `python examples/NAME ARGV` would run it."""
    old = sys.argv
    sys.argv = [name, *map(str, argv)]
    try:
        runpy.run_path(str(REPO / "examples" / name), run_name="__main__")
    finally:
        sys.argv = old


def step_losses(path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("kind", ["top-k", "sample"])
def test_own_loop_trainer_and_train_student_take_the_same_steps(setup, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    cache, student = setup["caches"][kind], setup["student"]
    common = ["--cache", cache, "--student", student, *FLAGS]
    cli_ok(["train-student", *common, "--out", tmp_path / "cli", "--log-every", 1, "--no-progress"])
    run_example("own_loop.py", [*common, "--out", tmp_path / "own"])
    run_example("hf_trainer.py", [*common, "--out", tmp_path / "hf"])
    want = step_losses(tmp_path / "cli" / "metrics.jsonl")
    assert [s for s, _ in want] == list(range(1, STEPS + 1))
    for name in ("own", "hf"):
        got = step_losses(tmp_path / name / "losses.jsonl")
        assert [s for s, _ in got] == [s for s, _ in want], name
        # Same batches, arithmetic and dropout masks: equal on CPU fp32 (1e-5 relative is the stated bound).
        for (step, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-5), (name, step, a, b)
        # The student loads as a plain transformers model, and `kdcache evaluate` reads it.
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert model.config.num_hidden_layers == 1
        metrics = json.loads(cli_ok(["evaluate", "--model", tmp_path / name, "--cache", cache, "--json"]))
        assert metrics["positions"] > 0
    assert want[-1][1] < want[0][1]  # it learnt something
    final = load_file(tmp_path / "cli" / "model.safetensors")
    for name in ("own", "hf"):
        other = load_file(tmp_path / name / "model.safetensors")
        for key in final:
            torch.testing.assert_close(other[key], final[key], rtol=1e-5, atol=1e-7)


def test_trainer_killed_after_a_checkpoint_resumes_to_the_same_weights(setup, tmp_path):
    cache, student = setup["caches"]["top-k"], setup["student"]
    common = ["--cache", cache, "--student", student, "--max-steps", 60, "--batch-size", 4, "--lr", "1e-3",
              "--seed", 2, "--save-steps", 5]
    run_example("hf_trainer.py", [*common, "--out", tmp_path / "straight"])
    split = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "hf_trainer.py"), *map(str, common),
                             "--out", str(split)], env=single_thread_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (split / "checkpoint-5" / "trainer_state.json").is_file() and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (split / "model.safetensors").exists()
    assert len(step_losses(split / "losses.jsonl")) < 60
    run_example("hf_trainer.py", [*common, "--out", split, "--resume"])
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU
    assert step_losses(split / "losses.jsonl") == step_losses(tmp_path / "straight" / "losses.jsonl")


def test_trainer_under_torchrun_reads_every_row_once_per_epoch(setup, tmp_path):
    import pyarrow.parquet as pq

    cache = setup["caches"]["top-k"]
    launch = torchrun([str(REPO / "tests" / "kd_trainer_rows.py"), cache, setup["student"], tmp_path],
                      nproc_per_node=2, timeout=240)
    assert launch.ok, launch.text[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["steps"] == r["steps_per_epoch"] for r in ranks)
    ids = ranks[0]["ids"] + ranks[1]["ids"]
    everything = pq.read_table(cache / "data", columns=["example_id"]).column("example_id").to_pylist()
    assert sorted(ids) == sorted(everything) and not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas equal: gradients were synchronised


def test_trainer_refuses_a_model_of_another_task(setup, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, TrainingArguments

    from kdcache.integrations.transformers import KDTrainer

    model = BertForMaskedLM(BertConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[])
    trainer = KDTrainer(model=model, args=args, train_dataset=setup["caches"]["top-k"])
    with pytest.raises(KdcacheError, match="AutoModelForCausalLM"):
        trainer.train()
    with pytest.raises(KdcacheError, match="train_dataset"):
        KDTrainer(model=model, args=args, train_dataset=[1, 2])
    import kdcache
    with pytest.raises(KdcacheError, match="TrainStream was made for"):
        KDTrainer(model=model, args=args, train_dataset=kdcache.TrainStream(setup["caches"]["top-k"], batch_size=3))


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    from kdcache.integrations.transformers import STREAM_STATE, last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, files in ((5, ["trainer_state.json", STREAM_STATE]), (10, [STREAM_STATE, "model.safetensors"]),
                        (3, ["trainer_state.json", STREAM_STATE])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    # checkpoint-10 was being written when the run was killed (no trainer_state.json yet).
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


def readme_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it from your own trainer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run(setup, tmp_path, monkeypatch):
    """Every python block of the README's section, in order, in one namespace, against a tiny
    cache at ./cache and a student at ./student (the names the README uses)."""
    snippets = readme_snippets()
    assert len(snippets) >= 3
    (tmp_path / "cache").symlink_to(setup["caches"]["sample"])
    (tmp_path / "student").symlink_to(setup["student"])
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "config.json").is_file()


def test_train_stream_runs_epochs_and_restores_mid_epoch_and_past_a_boundary(tmp_path):
    import kdcache
    from stage2_helpers import synthetic_cache

    cache = kdcache.open_cache(synthetic_cache(tmp_path / "cache", num_rows=150))
    assert cache.num_rows == 150 and cache.target_kind == "top-k" and cache.num_positions > 150

    def ids(stream, n):
        return [b["example_id"].tolist() for _, b in zip(range(n), stream)]

    straight = kdcache.TrainStream(cache, batch_size=16, seed=4, num_workers=0, world_size=1, rank=0)
    assert straight.steps_per_epoch() == 10
    everything = ids(straight, 25)  # two and a half epochs
    for epoch in (0, 1):
        rows = sum(everything[10 * epoch:10 * epoch + 10], [])
        assert sorted(rows) == list(range(1000, 1150))  # every row once per epoch
    assert everything[:10] != everything[10:20]  # reshuffled per epoch
    for cut in (7, 13):
        first = kdcache.TrainStream(cache, batch_size=16, seed=4, num_workers=0, world_size=1, rank=0)
        ids(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # plain JSON
        again = kdcache.TrainStream(cache, batch_size=16, seed=4, num_workers=0, world_size=1, rank=0)
        again.load_state_dict(state)
        assert ids(again, 25 - cut) == everything[cut:], cut
