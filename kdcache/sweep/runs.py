"""A sweep's run folders: naming students, recording how each was trained, and its state on disk."""
from __future__ import annotations

import json
from pathlib import Path

from ..cache.files import atomic_write_json
from ..cache.storage import describe
from ..errors import KdcacheError
from .specs import Student

# Written by the sweep into each run folder before training starts: the exact train-student
# arguments, so a re-run can tell "resume this run" from "this folder holds something else".
SWEEP_RECORD = "sweep.json"
TRAIN_SUMMARY = "train_summary.json"
TRAIN_LOG = "train.log"

# Options that say how to run, not what to train: changing them between re-runs is fine.
RUNTIME_OPTIONS = ("--device", "--num-workers", "--save-every", "--stop-after-steps", "--log-every")
RUNTIME_FLAGS = ("--no-progress",)
# What a started-but-never-trained folder may hold: the sweep's record and log, train-student's
# opening summary (steps 0) and an empty metrics log. Anything else counts as progress.
_SETUP_FILES = (SWEEP_RECORD, TRAIN_LOG, TRAIN_SUMMARY, "metrics.jsonl")


def option_value(args: list[str], option: str) -> str | None:
    """Value of `--option V` / `--option=V` in a train-student argument list (last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def has_flag(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def without_options(args: list[str], options: tuple[str, ...]) -> list[str]:
    """`args` minus the given value-taking options (both `--opt V` and `--opt=V` forms)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(opt + "=") for opt in options):
            continue
        out.append(arg)
    return out


def training_identity(cache: Path, student: Student, train_args: list[str]) -> dict:
    """What a run folder's result depends on; a re-run with a different identity is refused.

    train_args: everything this student's train-student gets besides --cache/--student/--out
    (the sweep's options, its per-student options and its learning rate)."""
    return {
        "cache": describe(cache),
        "student": student.spec,
        "train_args": [a for a in without_options(train_args, RUNTIME_OPTIONS) if a not in RUNTIME_FLAGS],
    }


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_finished(run_dir: Path) -> bool:
    summary = read_json(Path(run_dir) / TRAIN_SUMMARY)
    return bool(summary and summary.get("done"))


def has_progress(run_dir: Path) -> bool:
    """Anything train-student wrote (checkpoints, metrics): the run is resumed, not restarted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return any(p.name not in (SWEEP_RECORD, TRAIN_LOG) for p in run_dir.iterdir())


def never_trained(run_dir: Path) -> bool:
    """The folder holds only a failed start: no completed step, no checkpoint, no weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return True
    if any(p.name not in _SETUP_FILES for p in run_dir.iterdir()):
        return False
    summary = read_json(run_dir / TRAIN_SUMMARY)
    if (run_dir / TRAIN_SUMMARY).exists() and (summary is None or summary.get("done") or summary.get("steps")):
        return False
    metrics = run_dir / "metrics.jsonl"
    return not (metrics.exists() and metrics.read_text().strip())


def check_or_record(run_dir: Path, identity: dict, extra: dict | None = None, echo=print) -> None:
    """Refuse to reuse a folder trained with other options; otherwise (re)write the record.

    A folder whose student never completed a step (a failed start: a typo in the spec, a bad
    option) holds nothing worth keeping, so a changed identity simply replaces it."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / SWEEP_RECORD)
    if record is not None and record.get("identity") != identity:
        old, new = record.get("identity") or {}, identity
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if not never_trained(run_dir):
            raise KdcacheError(
                f"{run_dir} was trained with a different {', '.join(keys)} than this sweep asks for; "
                "use another --out, another NAME=SPEC, or delete that folder to retrain it")
        echo(f"[sweep] {run_dir.name}: replacing {run_dir}: it never completed a step with its old "
             f"{', '.join(keys)} ({old.get('student')}); starting afresh")
        for name in _SETUP_FILES:
            (run_dir / name).unlink(missing_ok=True)
        record = None
    if record is None and has_progress(run_dir) and not is_finished(run_dir):
        raise KdcacheError(
            f"{run_dir} holds an unfinished run the sweep did not start (no {SWEEP_RECORD}); "
            "resume it with `kdcache train-student --resume`, or delete it, or use another --out")
    if record is None and not has_progress(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / SWEEP_RECORD, {"identity": identity, **(extra or {})})


def run_mode(train_args: list[str]) -> str:
    """How a run was taught: 'online KD' (teacher in the loop), 'hard labels' (alpha 0) or 'cached KD'."""
    if option_value(train_args, "--online-teacher"):
        return "online KD"
    alpha = option_value(train_args, "--alpha")
    try:
        if alpha is not None and float(alpha) == 0.0:
            return "hard labels"
    except ValueError:
        pass
    return "cached KD"
