"""Gathering a sweep's finished runs and evaluating each once on a held-out cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cache.files import atomic_write_json, file_sha256
from ..cache.manifest import manifest_path
from ..cache.storage import ObjectPath, describe, location
from ..errors import KdcacheError
from .runs import SWEEP_RECORD, TRAIN_SUMMARY, read_json, run_mode

# Evaluation results are kept next to each run, keyed by what they depend on, so re-running
# `kdcache report` after adding one student evaluates only that student.
EVAL_RECORD = "eval.json"


@dataclass
class Run:
    name: str
    path: Path
    mode: str                       # cached KD | online KD | hard labels | teacher
    summary: dict
    train_args: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @property
    def num_parameters(self) -> int | None:
        return self.summary.get("num_parameters")

    @property
    def tokens_per_second(self) -> float | None:
        return self.summary.get("tokens_per_second")


def find_runs(runs_dir: Path) -> tuple[list[Run], list[Path]]:
    """(finished runs, folders of unfinished ones) directly under runs_dir."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise KdcacheError(f"sweep folder {runs_dir} does not exist; pass the --out of `kdcache sweep`")
    finished, unfinished = [], []
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        summary = read_json(path / TRAIN_SUMMARY)
        record = read_json(path / SWEEP_RECORD)
        if summary is None and record is None:
            continue  # not a run folder (e.g. a cache kept next to the runs)
        if not (summary and summary.get("done")):
            unfinished.append(path)
            continue
        train_args = ((record or {}).get("identity") or {}).get("train_args") or summary_args(summary)
        finished.append(Run(path.name, path, run_mode(train_args), summary, train_args))
    if not finished:
        raise KdcacheError(
            f"no finished student under {runs_dir} (looked for */{TRAIN_SUMMARY} with done: true); "
            "run `kdcache sweep --out " f"{runs_dir} ...` first")
    return finished, unfinished


def summary_args(summary: dict) -> list[str]:
    """For a run trained without the sweep: rebuild the options that decide its mode from its summary."""
    args = []
    for key, option in (("online_teacher", "--online-teacher"), ("alpha", "--alpha")):
        value = summary.get(key) if key in summary else (summary.get("args") or {}).get(key)
        if value is not None:
            args += [option, str(value)]
    return args


def train_cache(run: Run) -> Path | ObjectPath | None:
    """The cache a run trained from (its sweep record, else its train summary): a folder or a URI."""
    record = read_json(run.path / SWEEP_RECORD) or {}
    cache = (record.get("identity") or {}).get("cache") or run.summary.get("cache")
    return location(cache) if cache else None


def evaluate_dir(model_dir: Path, eval_cache: Path | ObjectPath | str, record_path: Path | None,
                 fresh: bool = False) -> dict:
    """`kdcache evaluate`'s numbers for one model, reusing record_path (JSON) when still valid."""
    from ..train.evaluate import evaluate  # stage two's library entry point: the same numbers as the CLI

    model_dir, eval_cache = Path(model_dir), location(eval_cache)
    key = {
        "eval_cache": describe(eval_cache),
        "eval_manifest_sha256": file_sha256(manifest_path(eval_cache)),
        "model_summary_sha256": file_sha256(model_dir / TRAIN_SUMMARY) if (model_dir / TRAIN_SUMMARY).is_file() else None,
    }
    if record_path is not None and not fresh:
        old = read_json(record_path)
        if old and old.get("key") == key and isinstance(old.get("metrics"), dict):
            return old["metrics"]
    metrics = dict(evaluate(model_dir, eval_cache, progress=True))
    if record_path is not None:
        atomic_write_json(record_path, {"key": key, "metrics": metrics})
    return metrics
