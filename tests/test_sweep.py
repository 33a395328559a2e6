"""`kdcache sweep`: students trained from one cache by real train-student subprocesses, resumably."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sweep_helpers import TRAIN, dump, run_cli

STUDENTS = "L2-H128,wide=L2-H256"


def summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, tiny_llama_clm, shakespeare_txt):
    """A sweep cut short after 2 of 4 steps (--stop-after-steps), then the same sweep again.

    The first run takes the one-student-per-GPU path (`--gpus 0,1`: two children at once, each with its
    own CUDA_VISIBLE_DEVICES and log file); on a CPU-only machine the children simply train on the CPU.
    """
    root = tmp_path_factory.mktemp("sweep")
    cache = dump(tiny_llama_clm, shakespeare_txt, root / "cache")
    runs = root / "runs"
    args = ["sweep", "--cache", cache, "--students", STUDENTS, "--out", runs, *TRAIN]
    assert run_cli([*args, "--stop-after-steps", 2, "--gpus", "0,1"]) == 0
    after_stop = {name: summary(runs / name) for name in ("L2-H128", "wide")}
    # The resumed run in parallel too (imports are single-threaded: two children cost one's wall time).
    assert run_cli([*args, "--gpus", "0,1"]) == 0
    return cache, runs, args, after_stop


def test_interrupted_students_resume_to_the_end(interrupted_then_resumed):
    _, runs, _, after_stop = interrupted_then_resumed
    for name, spec in (("L2-H128", "L2-H128"), ("wide", "L2-H256")):
        assert after_stop[name]["done"] is False and after_stop[name]["steps"] == 2
        final = summary(runs / name)
        assert final["done"] is True and final["steps"] == 4 and final["student"]["spec"] == spec
        # Resumed, not restarted: the metrics log has every step once, and the 2 steps before the
        # interruption were not paid for twice.
        steps = [json.loads(line)["step"] for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 4
        assert final["tokens"] == 2 * after_stop[name]["tokens"]
        assert (runs / name / "model.safetensors").is_file()
    assert (runs / "wide" / "config.json").read_text().count('"hidden_size": 256') == 1
    # The parallel first run logged each child to its own file.
    for name in ("L2-H128", "wide"):
        assert "stopped at step 2 of 4" in (runs / name / "train.log").read_text()


def test_gpu_slots(monkeypatch):
    from kdcache.errors import KdcacheError
    from kdcache.sweep.launcher import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert gpu_slots("auto") == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpu_slots("auto") == [None]  # one GPU: one run at a time, environment untouched
    assert gpu_slots("cpu") == [None] and gpu_slots("0, 1") == ["0", "1"] and gpu_slots("1") == ["1"]
    with pytest.raises(KdcacheError, match="mixes cpu"):
        gpu_slots("cpu,0")


def test_rerun_trains_only_the_unfinished_student(interrupted_then_resumed, tmp_path, capfd):
    cache, runs, args, _ = interrupted_then_resumed
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    kept = (copy / "L2-H128" / "model.safetensors").stat().st_mtime_ns
    (copy / "wide" / "train_summary.json").unlink()  # as if `wide` had died before finishing
    capfd.readouterr()
    assert run_cli([a if a != runs else copy for a in args]) == 0
    out = capfd.readouterr()
    assert "L2-H128: finished already" in out.out
    assert "wide: resuming L2-H256" in out.out and "1 trained, 1 skipped" in out.out
    assert (copy / "L2-H128" / "model.safetensors").stat().st_mtime_ns == kept
    assert summary(copy / "wide")["done"] is True


def test_all_finished_is_a_no_op(interrupted_then_resumed, capfd):
    _, runs, args, _ = interrupted_then_resumed
    capfd.readouterr()
    # How-to-run options (workers, progress bar) may change between re-runs; they are not identity.
    assert run_cli([*args, "--num-workers", 0, "--no-progress"]) == 0
    assert "all 2 students finished; nothing to do" in capfd.readouterr().out


def test_changed_options_are_refused_not_mixed(interrupted_then_resumed, capfd):
    _, runs, args, _ = interrupted_then_resumed
    before = (runs / "L2-H128" / "train_summary.json").read_text()
    capfd.readouterr()
    assert run_cli([*args[:-len(TRAIN)], "--max-steps", 4, "--batch-size", 4, "--lr", 1e-4]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "L2-H128 was trained with a different train_args" in err[0]
    assert (runs / "L2-H128" / "train_summary.json").read_text() == before


@pytest.mark.parametrize("extra, message", [
    (["--students", "a=L2-H128,a=L4-H256"], "names two runs 'a'"),
    (["--students", "L2-H128", "--resume"], "sweep sets --resume"),
    (["--students", "bad name=L2-H128"], "is not SPEC or NAME=SPEC"),
])
def test_bad_sweep_arguments(interrupted_then_resumed, tmp_path, capfd, extra, message):
    cache = interrupted_then_resumed[0]
    capfd.readouterr()
    assert run_cli(["sweep", "--cache", cache, "--out", tmp_path / "r", *extra]) == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_missing_cache_is_one_line_error(tmp_path, capfd):
    assert run_cli(["sweep", "--cache", tmp_path / "nope", "--students", "L2-H128", "--out", tmp_path / "r"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
