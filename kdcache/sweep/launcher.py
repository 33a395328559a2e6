"""Running train-student subprocesses: one after another, or one per visible GPU at a time."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KdcacheError


@dataclass
class Job:
    name: str
    argv: list[str]          # arguments after `python -m kdcache`
    log: Path                # where the child's output goes when runs share the terminal
    returncode: int | None = None
    seconds: float = 0.0
    device: str | None = field(default=None)


def gpu_slots(devices: str) -> list[str | None]:
    """Device slots to run students on. None = inherit the environment (one run at a time).

    'auto': one slot per GPU visible to this process when there are two or more, else one slot.
    'cpu' or a single device: one slot. '0,1,3': one slot per listed GPU.
    """
    if devices == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        else:
            try:
                import torch
                ids = [str(i) for i in range(torch.cuda.device_count())]
            except Exception:  # no usable torch/CUDA: run on whatever train-student picks
                ids = []
        return ids if len(ids) >= 2 else [None]
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids:
        raise KdcacheError("--gpus is empty; use auto, cpu, or a comma-separated GPU list like 0,1")
    if ids == ["cpu"]:
        return [None]
    if "cpu" in ids:
        raise KdcacheError(f"--gpus {devices!r} mixes cpu with GPU ids; use cpu alone or GPU ids alone")
    return ids


def _command(job: Job) -> list[str]:
    return [sys.executable, "-m", "kdcache", *job.argv]


def _env(device: str | None) -> dict:
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def run_jobs(jobs: list[Job], slots: list[str | None], echo=print) -> list[Job]:
    """Run every job; returns them with return codes. Never raises for a failed job.

    With one slot the child shares this terminal (its progress bar shows live). With several,
    each child writes to its own log file and a line is printed as each one ends.
    """
    if len(slots) <= 1:
        for job in jobs:
            job.device = slots[0] if slots else None
            start = time.perf_counter()
            job.returncode = subprocess.run(_command(job), env=_env(job.device)).returncode
            job.seconds = time.perf_counter() - start
            echo(f"[sweep] {job.name}: {'done' if job.returncode == 0 else f'FAILED (exit {job.returncode})'} "
                 f"in {job.seconds:.0f} s")
        return jobs

    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, object, float]] = {}
    free = list(slots)
    try:
        while pending or running:
            while pending and free:
                job, device = pending.pop(0), free.pop(0)
                job.device = device
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "ab")
                proc = subprocess.Popen(_command(job), env=_env(device), stdout=log, stderr=subprocess.STDOUT)
                running[job.name] = (job, proc, log, time.perf_counter())
                echo(f"[sweep] {job.name}: started on GPU {device} (log: {job.log})")
            time.sleep(0.5)
            for name, (job, proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                job.returncode, job.seconds = proc.returncode, time.perf_counter() - start
                free.append(job.device)
                del running[name]
                echo(f"[sweep] {job.name}: {'done' if job.returncode == 0 else f'FAILED (exit {job.returncode}), see {job.log}'} "
                     f"in {job.seconds:.0f} s")
    finally:
        # Interrupted (Ctrl-C): stop the children we started; their checkpoints let a re-run resume.
        for job, proc, log, _ in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return jobs
