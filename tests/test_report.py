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
