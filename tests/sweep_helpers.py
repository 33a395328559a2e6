"""Helpers for the sweep/report tests: real caches from the tiny Llama teacher, CLI calls in-process."""
from __future__ import annotations

from pathlib import Path

from kdcache.cli import main


def run_cli(argv) -> int:
    """Run `kdcache ARGV` in this process; returns the exit code (0 when the command returned)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def dump(teacher: Path, data: Path, out: Path) -> Path:
    rc = run_cli(["dump-logits", "--teacher", teacher, "--data", data, "--out", out, "--task", "clm",
                  "--max-length", 32, "--targets", "top-k", "--top-k", 16, "--batch-size", 8])
    assert rc == 0, f"dump-logits failed with exit {rc}"
    return out


# Train-student options shared by every test sweep: tiny, fast, no DataLoader worker processes.
TRAIN = ["--max-steps", 4, "--batch-size", 4, "--lr", 3e-3, "--num-workers", 0]
