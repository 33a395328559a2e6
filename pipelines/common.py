"""What the three pipelines share: arguments, timed steps, running kdcache commands, data splits."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # every model comes from a local folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(name: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"pipelines/{name}.py", description=description)
    parser.add_argument("--small", action="store_true",
                        help="a few minutes on 2 CPU cores (small corpus, few steps); default: the full run, meant for a GPU")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder [default: runs/{name}, or runs/{name}-small with --small]")
    args = parser.parse_args()
    if args.out is None:
        args.out = REPO / "runs" / (f"{name}-small" if args.small else name)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


class Pipeline:
    """Prints each step with its wall time and keeps the timings for the closing summary."""

    def __init__(self, name: str, out: Path):
        self.name, self.out, self.start, self.steps = name, out, time.perf_counter(), []

    @contextmanager
    def step(self, title: str):
        print(f"\n=== [{self.name}] {title}", flush=True)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.steps.append((title, seconds))
        print(f"=== [{self.name}] {title}: {seconds:.0f} s", flush=True)

    def kdcache(self, *args) -> None:
        """Run one kdcache command exactly as a user would type it (echoed); stop the pipeline if it fails."""
        argv = [str(a) for a in args]
        print("$ kdcache " + " ".join(argv), flush=True)
        rc = subprocess.run([sys.executable, "-m", "kdcache", *argv]).returncode
        if rc != 0:
            sys.exit(f"[{self.name}] `kdcache {argv[0]}` failed (exit {rc}); fix the error above and re-run: "
                     "finished steps are skipped")

    def dump_logits(self, out: Path, *args) -> None:
        """`kdcache dump-logits ... --out OUT`, skipped when OUT already holds a complete cache.

        (A no-op re-run would resume fine, but it would also replace the manifest's record of the
        dump's time and teacher rate, which the report's amortisation reads.)
        """
        manifest = Path(out) / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
            print(f"cache {out} is complete; skipped (delete it to dump again)", flush=True)
            return
        self.kdcache("dump-logits", *args, "--out", out)

    def finish(self) -> None:
        total = time.perf_counter() - self.start
        print(f"\n=== [{self.name}] done in {total / 60:.1f} min; per step:")
        for title, seconds in self.steps:
            print(f"    {seconds:7.0f} s  {title}")
        (self.out / "pipeline_timings.json").write_text(json.dumps(
            {"total_seconds": total, "steps": [{"step": t, "seconds": s} for t, s in self.steps]}, indent=2) + "\n")


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:  # unchanged files keep the caches' identity
        path.write_text(text)
    return path


def shakespeare_split(out: Path, train_chars: int | None, heldout_chars: int) -> tuple[Path, Path]:
    """Tiny Shakespeare cut by position: the held-out text is the last `heldout_chars`, never trained on.

    train_chars None = everything before the held-out part.
    """
    lines = (DATA / "tinyshakespeare.txt").read_text().splitlines()
    heldout, size = [], 0
    while lines and size < heldout_chars:
        line = lines.pop()
        heldout.insert(0, line)
        size += len(line) + 1
    train, size = [], 0
    for line in lines:
        if train_chars is not None and size >= train_chars:
            break
        train.append(line)
        size += len(line) + 1
    keep = lambda ls: [l for l in ls if l.strip()]
    return write_lines(out / "data" / "train.txt", keep(train)), write_lines(out / "data" / "heldout.txt", keep(heldout))


def teacher_shaped_config(teacher: Path, layers: int, out: Path) -> Path:
    """The teacher's own config.json with `layers` layers: a student that --init-from-teacher can fill
    with the teacher's embeddings and evenly spaced layers (every other size stays the teacher's)."""
    config = json.loads((Path(teacher) / "config.json").read_text())
    config["num_hidden_layers"] = max(1, layers)
    config.pop("architectures", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_lines(out, json.dumps(config, indent=2).splitlines())
    return out


def students_and_baselines(p: Pipeline, teacher: Path, cache: Path, runs: Path, size: dict, what: str = "") -> tuple[dict, str]:
    """Students of the teacher's shape with size["students"] layers, initialised from it, trained from `cache`
    into `runs`; the smallest also on hard labels only and with online KD (teacher in the loop, same steps).
    `what` names the targets in the step titles. Returns ({name: config}, the smallest's name)."""
    hidden = json.loads((Path(teacher) / "config.json").read_text())["hidden_size"]
    students = {f"L{n}-H{hidden}": teacher_shaped_config(teacher, n, cache.parent / "students" / f"L{n}" / "config.json")
                for n in size["students"]}
    train = ["--epochs", size["epochs"], "--batch-size", size["batch"], "--lr", size["lr"], "--seed", 0,
             "--save-every", 50, "--init-from-teacher"]
    smallest, spec = next(iter(students.items()))
    with p.step(f"stage two: sweep {len(students)} students from the cache{what}"):
        p.kdcache("sweep", "--cache", cache, "--students", ",".join(f"{n}={c}" for n, c in students.items()),
                  "--out", runs, *train)
    with p.step(f"baseline: {smallest} on hard labels only{what} (no teacher)"):
        p.kdcache("sweep", "--cache", cache, "--students", f"{smallest}-hard={spec}", "--out", runs, *train, "--alpha", 0)
    with p.step(f"baseline: {smallest} with online KD (teacher in the loop, same steps)"):
        p.kdcache("sweep", "--cache", cache, "--students", f"{smallest}-online={spec}", "--out", runs,
                  *train, "--online-teacher", teacher)
    return students, smallest


def show_report(runs: Path) -> None:
    print(f"\nreport: {runs / 'report.md'}  plot: {runs / 'report.png'}")
