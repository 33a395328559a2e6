"""`kdcache report`: a table and plot whose numbers are `kdcache evaluate`'s, plus the teacher and amortisation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stage2_helpers import fp16_top1_ties
from sweep_helpers import TRAIN, dump, run_cli


@pytest.fixture(scope="module")
def report_setup(tmp_path_factory, tiny_llama_clm, shakespeare_txt):
    """Train and held-out caches of the tiny Llama teacher; four finished runs and one unfinished."""
    root = tmp_path_factory.mktemp("report")
    lines = shakespeare_txt.read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[:240]) + "\n")
    (root / "heldout.txt").write_text("\n".join(lines[240:]) + "\n")
    cache = dump(tiny_llama_clm, root / "train.txt", root / "cache")
    eval_cache = dump(tiny_llama_clm, root / "heldout.txt", root / "eval-cache")
    runs = root / "runs"
    # Runs made by train-student directly (no sweep record): the report reads their summaries.
    for name, student, extra in (("L2-H128", "L2-H128", []), ("L2-H256", "L2-H256", []),
                                 ("hard", "L2-H128", ["--alpha", 0]),
                                 ("online", "L2-H128", ["--online-teacher", tiny_llama_clm]),
                                 ("stopped", "L2-H128", ["--stop-after-steps", 2])):
        assert run_cli(["train-student", "--cache", cache, "--student", student, "--out", runs / name,
                        *TRAIN, *extra]) == 0
    return cache, eval_cache, runs, tiny_llama_clm


def evaluate_json(model: Path, cache: Path, capfd) -> dict:
    capfd.readouterr()
    assert run_cli(["evaluate", "--model", model, "--cache", cache, "--json"]) == 0
    return json.loads(capfd.readouterr().out.strip().splitlines()[-1])


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [l for l in markdown.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]
    return {r["student"]: r for r in rows}


def test_report_table_plot_and_amortisation(report_setup, capfd):
    cache, eval_cache, runs, teacher = report_setup
    capfd.readouterr()
    assert run_cli(["report", runs, "--eval-cache", eval_cache]) == 0
    printed = capfd.readouterr().out
    md = (runs / "report.md").read_text()
    rows = table_rows(md)
    assert set(rows) == {"L2-H128", "L2-H256", "hard", "online", "teacher"}
    assert [rows[n]["mode"] for n in ("L2-H128", "L2-H256", "hard", "online")] == [
        "cached KD", "cached KD", "hard labels", "online KD"]
    assert "`stopped`" in md and "unfinished" in md  # listed, not evaluated
    assert table_rows(printed) == rows  # the printed table is the file's

    # Every student's numbers are exactly what `kdcache evaluate --json` says about it.
    for name in ("L2-H128", "L2-H256", "hard", "online"):
        ev = evaluate_json(runs / name, eval_cache, capfd)
        summary = json.loads((runs / name / "train_summary.json").read_text())
        row = rows[name]
        assert row["KL to teacher"] == f"{ev['kl']:.4f}"
        assert row["top-1 agreement"] == f"{ev['top1_agreement']:.2%}"
        assert row["accuracy"] == f"{ev['accuracy']:.2%}"
        assert row["perplexity"] == f"{ev['perplexity']:,.2f}"
        assert row["parameters"] == f"{summary['num_parameters'] / 1e6:.2f}M"
        assert row["train tokens/s"] == f"{summary['tokens_per_second']:,.0f}"
    assert rows["L2-H256"]["parameters"] != rows["L2-H128"]["parameters"]

    # The teacher's row: the teacher itself evaluated on the held-out cache agrees with its own
    # cached targets, and its accuracy is the one the cache alone implies.
    manifest = json.loads((eval_cache / "manifest.json").read_text())
    t = rows["teacher"]
    ties, positions = fp16_top1_ties(eval_cache)  # the only places a re-run may pick another top-1
    assert float(t["KL to teacher"]) < 1e-3
    assert float(t["top-1 agreement"].rstrip("%")) >= round(100 * (1 - ties / positions), 2)
    assert t["accuracy"] == f"{ev['teacher_accuracy']:.2%}"
    assert t["parameters"] == f"{manifest['teacher']['num_parameters'] / 1e3:.1f}k"

    # Amortisation: dump time once vs teacher time for every cached-KD student's tokens.
    train_manifest = json.loads((cache / "manifest.json").read_text())
    tokens = sum(json.loads((runs / n / "train_summary.json").read_text())["tokens"] for n in ("L2-H128", "L2-H256"))
    ratio = tokens / train_manifest["dump"]["tokens_per_second"] / train_manifest["dump"]["seconds"]
    assert f"= **{ratio:.2f}×** teacher time saved by caching" in md
    assert re.search(r"`online` \(online KD, teacher in the loop\) trained in [\d.]+ s, `L2-H128`", md)

    png = (runs / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "report.png" in md


def test_report_reuses_evaluations_until_fresh(report_setup, capfd):
    _, eval_cache, runs, _ = report_setup
    assert run_cli(["report", runs, "--eval-cache", eval_cache]) == 0
    record = runs / "hard" / "eval.json"
    real = json.loads(record.read_text())
    planted = {**real, "metrics": {**real["metrics"], "kl": 123.0}}
    record.write_text(json.dumps(planted))
    assert run_cli(["report", runs, "--eval-cache", eval_cache]) == 0
    assert table_rows((runs / "report.md").read_text())["hard"]["KL to teacher"] == "123.0000"
    assert run_cli(["report", runs, "--eval-cache", eval_cache, "--fresh"]) == 0
    assert table_rows((runs / "report.md").read_text())["hard"]["KL to teacher"] == f"{real['metrics']['kl']:.4f}"


def test_report_errors_are_one_line(report_setup, tmp_path, capfd):
    _, eval_cache, runs, _ = report_setup
    capfd.readouterr()
    assert run_cli(["report", tmp_path, "--eval-cache", eval_cache]) == 2
    assert "no finished student" in capfd.readouterr().err
    assert run_cli(["report", runs, "--eval-cache", tmp_path / "missing"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]


def test_eval_cache_of_another_teacher_is_refused(report_setup, tmp_path, capfd):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, runs, teacher = report_setup
    other = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        other.model.norm.weight.mul_(2.0)  # same shapes and tokenizer, different weights
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp_path / "other")
    held = tmp_path / "heldout.txt"
    held.write_text("Speak the speech, I pray you, as I pronounced it to you,\ntrippingly on the tongue.\n" * 8)
    other_eval = dump(tmp_path / "other", held, tmp_path / "other-eval")
    before = (runs / "report.md").read_text() if (runs / "report.md").exists() else None
    capfd.readouterr()
    assert run_cli(["report", runs, "--eval-cache", other_eval]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with another teacher" in err[0]
    assert ((runs / "report.md").read_text() if before is not None else None) == before


@pytest.fixture(scope="module")
def troubled_sweep(report_setup, tmp_path_factory):
    """A sweep where one student is fine, one collapses (lr 0.3: it answers the most common token),
    one diverges (lr 50), a larger one is under-trained (lr 3e-4) and one hardly moves (lr 1e-6): real
    runs, not planted numbers."""
    cache, eval_cache, _, _ = report_setup
    runs = tmp_path_factory.mktemp("troubled") / "runs"
    args = ["sweep", "--cache", cache, "--out", runs, "--max-steps", 30, "--batch-size", 8, "--lr", 3e-3,
            "--num-workers", 0, "--log-every", 5, "--no-progress"]
    assert run_cli([*args, "--students", "L2-H128,collapsed=L2-H128:lr=0.3,diverged=L2-H128:lr=50,big=L2-H256:lr=3e-4,"
                                   "still=L2-H128:lr=1e-6"]) == 0
    return cache, eval_cache, runs, args


def flag_lines(markdown: str) -> dict[str, list[str]]:
    section = markdown.split("## Flags", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        if m := re.match(r"- \*\*`([^`]+)`\*\*: (.*)", line):
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_report_flags_diverged_collapsed_and_non_monotone_students(troubled_sweep, capfd):
    from kdcache.sweep.flags import majority_rates

    cache, eval_cache, runs, args = troubled_sweep
    capfd.readouterr()
    assert run_cli(["report", runs, "--eval-cache", eval_cache]) == 0  # a diverged student does not break it
    printed = capfd.readouterr().out
    md = (runs / "report.md").read_text()
    assert "[report] flag: collapsed: predictions collapsed" in printed
    rows, flags = table_rows(md), flag_lines(md)
    assert {n: rows[n]["flag"] for n in rows} == {
        "L2-H128": "", "collapsed": "collapsed", "diverged": "diverged", "big": "worse than smaller",
        "still": "loss did not fall", "teacher": ""}
    assert set(flags) == {"collapsed", "diverged", "big", "still"}

    # Diverged: evaluate itself reports an infinite perplexity (it used to raise OverflowError).
    ev = evaluate_json(runs / "diverged", eval_cache, capfd)
    assert ev["perplexity"] == float("inf") and rows["diverged"]["perplexity"] == "inf"
    assert "the learning rate is too high" in flags["diverged"][0] and "diverged-lr5=L2-H128:lr=5 " in flags["diverged"][0]
    # Its training warned about the loss jump while it ran.
    warnings = json.loads((runs / "diverged" / "train_summary.json").read_text())["loss_warnings"]
    assert any("training loss jumped" in w for w in warnings)

    # Collapsed: accuracy and agreement at the rates of always answering the most common token
    # (an independent count over the eval cache's labels and the teacher's top-1).
    label_share, top1_share = majority_rates(eval_cache)
    ev = evaluate_json(runs / "collapsed", eval_cache, capfd)
    assert ev["accuracy"] <= label_share + 0.01 and ev["top1_agreement"] <= top1_share + 0.01
    good = evaluate_json(runs / "L2-H128", eval_cache, capfd)
    assert good["top1_agreement"] > top1_share + 0.05  # the healthy student is not flagged for a reason
    assert f"majority rate ({label_share:.2%})" in flags["collapsed"][0]

    # Larger but worse, at a far lower rate: the flag points at steps first, and retries a third and 3x the rate.
    assert "larger than `L2-H128`" in flags["big"][0] and "too few steps" in flags["big"][0]
    assert "big-lr0.0001=L2-H256:lr=0.0001,big-lr0.0009=L2-H256:lr=0.0009" in flags["big"][0]
    # Hardly moved: the loss crept down smoothly, so the rate was too low: retried ten times higher.
    assert "a learning rate too low" in flags["still"][0] and "still-lr1e-05=L2-H128:lr=1e-05" in flags["still"][0]


def test_flag_retry_command_runs(troubled_sweep, capfd):
    """The retry a flag proposes is a working command: the collapsed student at a third and at 3x its rate."""
    import shlex

    _, eval_cache, runs, _ = troubled_sweep
    assert run_cli(["report", runs, "--eval-cache", eval_cache]) == 0
    flag = flag_lines((runs / "report.md").read_text())["collapsed"][0]
    command = re.search(r"Retry: `([^`]+)`", flag).group(1)
    assert command.startswith("kdcache sweep ") and "collapsed-lr0.1=L2-H128:lr=0.1,collapsed-lr0.9=L2-H128:lr=0.9" in command
    assert run_cli(shlex.split(command)[1:]) == 0
    for name, lr in (("collapsed-lr0.1", 0.1), ("collapsed-lr0.9", 0.9)):
        retried = json.loads((runs / name / "train_summary.json").read_text())
        assert retried["done"] and retried["args"]["lr"] == lr and retried["args"]["max_steps"] == 30


def test_curve_flag_blames_the_rate_when_the_larger_student_had_the_higher_one(tmp_path):
    from kdcache.sweep.collect import Run
    from kdcache.sweep.flags import curve_flags

    def run(name, params, accuracy, lr, mode="cached KD"):
        (tmp_path / name).mkdir()
        summary = {"num_parameters": params, "args": {"lr": lr}, "student": {"spec": name}, "cache": "c",
                   "total_steps": 100}
        return Run(name, tmp_path / name, mode, summary, metrics={"accuracy": accuracy})

    runs = [run("small", 1_000, 0.80, 1e-3), run("big", 4_000, 0.65, 1e-3), run("bigger", 9_000, 0.81, 5e-4),
            run("noise", 5_000, 0.797, 1e-3), run("hard", 8_000, 0.5, 1e-3, mode="hard labels")]
    flags = curve_flags(runs, tmp_path, "accuracy", skip=set())
    assert [f.name for f in flags] == ["big"]  # within 0.5 points is noise; other modes are their own curve
    assert "a learning rate too high for its width (lr 0.001" in flags[0].cause
    assert "--lr 0.00033" in flags[0].retry and "--lr 0.003 " in flags[0].retry  # no sweep record: train-student
    runs[1].metrics["accuracy"] = 0.798
    assert curve_flags(runs, tmp_path, "accuracy", skip=set()) == []


def test_collapse_blames_the_teacher_when_it_is_no_better_than_the_majority(tmp_path):
    """Pipeline 2's small teacher answers one token at 86 % of positions: its students agree with it
    by doing the same, and no student rate can fix that."""
    from kdcache.sweep.collect import Run
    from kdcache.sweep.flags import run_flags

    (tmp_path / "s").mkdir()
    run = Run("s", tmp_path / "s", "cached KD", {"args": {"lr": 5e-4}, "student": {"spec": "L2-H128"}, "cache": "c"},
              metrics={"accuracy": 0.049, "top1_agreement": 0.8626, "kl": 0.3, "k": 64})
    weak = run_flags(run, tmp_path, (0.06, 0.8626), teacher_accuracy=0.0458)
    assert [f.kind for f in weak] == ["collapsed"] and "the teacher itself is no better" in weak[0].cause
    strong = run_flags(run, tmp_path, (0.06, 0.8626), teacher_accuracy=0.40)
    assert "does not fit its width" in strong[0].cause
    run.metrics["top1_agreement"] = 0.90  # agrees with the teacher beyond its most common answer: learnt something
    assert run_flags(run, tmp_path, (0.06, 0.8626), teacher_accuracy=0.0458) == []
