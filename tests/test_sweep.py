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
    (["--students", "L2-H128:lr=fast"], "--lr 'fast': 'fast' is not a valid float"),
    (["--students", "L2-H128:learning-rate=1e-3"], "--learning-rate is not a train-student option"),
    (["--students", "L2-H128:out=elsewhere"], "--out cannot be set per student"),
    (["--students", "L2-H128:init-from-teacher=yes"], "--init-from-teacher is a flag"),
    (["--students", "L2-H128:batch-size=0"], "--batch-size '0'"),
    (["--students", "L2-H128", "--lr-rule", "sqrt"], "Invalid value for '--lr-rule'"),
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


def test_student_options_are_parsed_per_student():
    from kdcache.sweep.specs import parse_students

    small, big, init = parse_students("L2-H128, big=L4-H256:lr=3e-4:batch-size=16 ,cfg/x/config.json:init-from-teacher")
    assert (small.name, small.spec, small.options) == ("L2-H128", "L2-H128", ())
    assert (big.name, big.spec, big.option_args()) == ("big", "L4-H256", ["--lr", "3e-4", "--batch-size", "16"])
    assert big.option_text() == "lr=3e-4, batch-size=16"
    assert (init.name, init.spec, init.option_args()) == ("x", "cfg/x/config.json", ["--init-from-teacher"])


def test_learning_rate_rule(tmp_path):
    """Default: base 1e-3 x 128/width; an explicit --lr is one rate for all unless --lr-rule width
    asks to scale it; a student's own :lr always wins; the width comes from the preset, a config
    or a --hidden option."""
    from kdcache.sweep.command import student_args
    from kdcache.sweep.lr_rule import default_rule
    from kdcache.sweep.specs import parse_students

    config = tmp_path / "mid" / "config.json"
    config.parent.mkdir()
    config.write_text('{"model_type": "bert", "hidden_size": 384}')
    students = parse_students(f"L2-H128,L4-H256,{config},wide=L2-H128:hidden=512,own=L4-H256:lr=7e-5")

    def rates(train_args, rule=None):
        rule = rule or default_rule(train_args)
        return [float(a[a.index("--lr") + 1]) if "--lr" in a else None
                for a, _ in (student_args(s, train_args, rule) for s in students)]

    assert default_rule(["--max-steps", "5"]) == "width" and default_rule(["--lr=2e-3"]) == "none"
    assert rates(["--max-steps", "5"]) == pytest.approx([1e-3, 5e-4, 1e-3 / 3, 2.5e-4, 7e-5], rel=1e-2)
    assert rates(["--lr", "2e-3"]) == [2e-3, 2e-3, 2e-3, 2e-3, 7e-5]           # means what it says
    assert rates(["--lr", "2e-3"], "width") == pytest.approx([2e-3, 1e-3, 2e-3 / 3, 5e-4, 7e-5], rel=1e-2)
    assert rates([], "none") == [None, None, None, None, 7e-5]                  # train-student's default
    args, lr = student_args(students[1], ["--lr", "1", "--max-steps", "5"], "width")
    assert args == ["--max-steps", "5", "--lr", "0.5"] and lr.source == "width rule: 1 x 128/256"
    # An explicit --lr without the rule leaves the arguments as they were (older runs' records stay valid).
    assert student_args(students[0], ["--lr", "3e-3", "--max-steps", "4"], "none")[0] == ["--lr", "3e-3", "--max-steps", "4"]


def test_per_student_options_end_to_end(interrupted_then_resumed, tmp_path, capfd):
    """The width rule and a student's own options reach train-student, its summary and the report."""
    cache = interrupted_then_resumed[0]
    runs = tmp_path / "runs"
    capfd.readouterr()
    assert run_cli(["sweep", "--cache", cache, "--out", runs, "--students", "L2-H128,big=L2-H256:lr=2e-4:batch-size=2",
                    "--max-steps", 2, "--batch-size", 4, "--num-workers", 0, "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "L2-H128: training L2-H128, lr 0.001 (width rule: 0.001 x 128/128)" in out
    assert "big: training L2-H256, lr 0.0002 (per-student :lr); options lr=2e-4, batch-size=2" in out
    small, big = summary(runs / "L2-H128"), summary(runs / "big")
    assert (small["args"]["lr"], small["args"]["batch_size"]) == (1e-3, 4)
    assert (big["args"]["lr"], big["args"]["batch_size"]) == (2e-4, 2)
    assert big["tokens"] < small["tokens"]  # 2 steps of 2 rows vs 2 steps of 4
    record = json.loads((runs / "big" / "sweep.json").read_text())
    assert record["options"] == "lr=2e-4, batch-size=2" and record["lr"] == 2e-4
    assert record["identity"]["train_args"] == ["--max-steps", "2", "--lr", "2e-4", "--batch-size", "2"]

    from test_report import table_rows
    assert run_cli(["report", runs, "--eval-cache", cache, "--no-teacher-eval"]) == 0
    rows = table_rows((runs / "report.md").read_text())
    assert (rows["L2-H128"]["lr"], rows["big"]["lr"]) == ("0.001", "0.0002")
    assert (rows["L2-H128"]["options"], rows["big"]["options"]) == ("", "lr=2e-4, batch-size=2")


def test_corrected_spec_after_a_failed_start_just_runs(interrupted_then_resumed, tmp_path, capfd):
    cache = interrupted_then_resumed[0]
    runs = tmp_path / "runs"
    args = ["sweep", "--cache", cache, "--out", runs, "--max-steps", 2, "--batch-size", 4, "--num-workers", 0]
    assert run_cli([*args, "--students", "mid=L3-H384"]) == 2  # not a preset: the student fails at start-up
    assert json.loads((runs / "mid" / "sweep.json").read_text())["identity"]["student"] == "L3-H384"
    capfd.readouterr()
    assert run_cli([*args, "--students", "mid=L2-H256"]) == 0
    out = capfd.readouterr().out
    replaced = [line for line in out.splitlines() if "replacing" in line]
    assert len(replaced) == 1 and "never completed a step" in replaced[0] and "(L3-H384)" in replaced[0]
    assert summary(runs / "mid")["done"] is True and summary(runs / "mid")["student"]["spec"] == "L2-H256"


def test_folder_with_progress_is_still_protected(interrupted_then_resumed, tmp_path, capfd):
    cache = interrupted_then_resumed[0]
    runs = tmp_path / "runs"
    args = ["sweep", "--cache", cache, "--out", runs, "--max-steps", 4, "--batch-size", 4, "--num-workers", 0]
    assert run_cli([*args, "--students", "mid=L2-H128", "--stop-after-steps", 1]) == 0
    before = sorted(p.name for p in (runs / "mid").iterdir())
    assert "checkpoint" in before
    capfd.readouterr()
    assert run_cli([*args, "--students", "mid=L2-H256"]) == 2
    err = capfd.readouterr().err
    assert "was trained with a different student" in err and "replacing" not in err
    assert sorted(p.name for p in (runs / "mid").iterdir()) == before
