"""A sweep's run folders: naming students, recording how each was trained, and its state on disk."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..cache.manifest import atomic_write_json
from ..errors import KdcacheError

# Written by the sweep into each run folder before training starts: the exact train-student
# arguments, so a re-run can tell "resume this run" from "this folder holds something else".
SWEEP_RECORD = "sweep.json"
TRAIN_SUMMARY = "train_summary.json"
TRAIN_LOG = "train.log"

# Options that say how to run, not what to train: changing them between re-runs is fine.
RUNTIME_OPTIONS = ("--device", "--num-workers", "--save-every", "--stop-after-steps", "--log-every")
RUNTIME_FLAGS = ("--no-progress",)
# Options the sweep sets itself for every student.
SWEEP_OWNED_OPTIONS = ("--cache", "--student", "--out", "--resume")

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Student:
    name: str   # the run folder under RUNS/
    spec: str   # what `train-student --student` gets: a preset, a config.json or a model dir


def default_name(spec: str) -> str:
    """Run-folder name for a student spec: the preset itself, or the file/folder it points at."""
    path = Path(spec)
    if path.name == "config.json":
        name = path.parent.name or "student"
    elif path.suffix == ".json":
        name = path.stem
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def parse_students(text: str) -> list[Student]:
    """`L2-H128,L4-H256` or with explicit folder names `small=L2-H128,cfg=path/config.json`."""
    students = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = default_name(item), item
        name, spec = name.strip(), spec.strip()
        if not spec or not _NAME_OK.match(name):
            raise KdcacheError(
                f"--students entry {item!r} is not SPEC or NAME=SPEC with NAME made of letters, digits, '.', '_', '+', '-'; "
                "e.g. --students L2-H128,tiny=L2-H128")
        students.append(Student(name, spec))
    if not students:
        raise KdcacheError("--students is empty; give a comma-separated list such as L2-H128,L4-H256")
    seen = {}
    for s in students:
        if s.name in seen:
            raise KdcacheError(
                f"--students names two runs {s.name!r} ({seen[s.name]} and {s.spec}); name them apart with NAME=SPEC")
        seen[s.name] = s.spec
    return students


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
    """What a run folder's result depends on; a re-run with a different identity is refused."""
    return {
        "cache": str(Path(cache).resolve()),
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


def check_or_record(run_dir: Path, identity: dict) -> None:
    """Refuse to reuse a folder trained with other options; otherwise (re)write the record."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / SWEEP_RECORD)
    if record is not None and record.get("identity") != identity:
        old, new = record.get("identity") or {}, identity
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise KdcacheError(
            f"{run_dir} was trained with a different {', '.join(keys)} than this sweep asks for; "
            "use another --out, another NAME=SPEC, or delete that folder to retrain it")
    if record is None and has_progress(run_dir) and not is_finished(run_dir):
        raise KdcacheError(
            f"{run_dir} holds an unfinished run the sweep did not start (no {SWEEP_RECORD}); "
            "resume it with `kdcache train-student --resume`, or delete it, or use another --out")
    if record is None and not has_progress(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / SWEEP_RECORD, {"identity": identity})


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
