"""`kdcache sweep`: train several students from one cache, each into RUNS/<name>/, resumably."""
from __future__ import annotations

from pathlib import Path

import click

from ..cache.manifest import read_manifest
from ..errors import KdcacheError
from .launcher import Job, gpu_slots, run_jobs
from .runs import (
    SWEEP_OWNED_OPTIONS, TRAIN_LOG, TRAIN_SUMMARY, check_or_record, has_flag, has_progress,
    is_finished, parse_students, training_identity,
)


def plan(cache: Path, students, out: Path, train_args: list[str], echo=print) -> list[Job]:
    """One job per student still to train; finished students are skipped, interrupted ones resumed."""
    jobs = []
    for student in students:
        run_dir = out / student.name
        check_or_record(run_dir, training_identity(cache, student, train_args))
        if is_finished(run_dir):
            echo(f"[sweep] {student.name}: finished already ({run_dir / TRAIN_SUMMARY}), skipped")
            continue
        resume = has_progress(run_dir)
        echo(f"[sweep] {student.name}: {'resuming' if resume else 'training'} {student.spec} -> {run_dir}")
        argv = ["train-student", "--cache", str(cache), "--student", student.spec, "--out", str(run_dir),
                *train_args, *(["--resume"] if resume else [])]
        jobs.append(Job(student.name, argv, run_dir / TRAIN_LOG))
    return jobs


@click.command(
    "sweep",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any other option is passed unchanged to every `kdcache train-student` run "
           "(e.g. --max-steps 500 --batch-size 32 --alpha 0.5 --temperature 2; see `kdcache train-student --help`).",
)
@click.option("--cache", "cache", required=True, type=click.Path(path_type=Path),
              help="The cache every student trains from (the --out of `kdcache dump-logits`).")
@click.option("--students", required=True,
              help="Comma-separated student specs: presets like L2-H128,L4-H256, config.json files or model dirs. "
                   "NAME=SPEC names a run folder (e.g. hard=L2-H128).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Sweep folder: each student trains into OUT/<name>/.")
@click.option("--gpus", "devices", default="auto", show_default=True,
              help="auto: one student per visible GPU at a time when there are two or more, else one after another; "
                   "'0,1': those GPUs; cpu: one after another.")
@click.pass_context
def sweep_cmd(ctx, cache: Path, students: str, out: Path, devices: str):
    """Train several students from the same cache, each into its own folder.

    Re-running the same command resumes the sweep: students whose train_summary.json says done
    are skipped, interrupted ones continue from their last checkpoint (train-student --resume),
    and a folder trained with different options is refused rather than mixed.

    \b
    Example:
      kdcache sweep --cache runs/cache --students L2-H128,L4-H256 --out runs/sweep --max-steps 300
      kdcache report runs/sweep --eval-cache runs/eval-cache
    """
    train_args = list(ctx.args)
    for option in SWEEP_OWNED_OPTIONS:
        if has_flag(train_args, option):
            raise KdcacheError(f"sweep sets {option} for each student itself; drop it from the command line")
    read_manifest(cache)  # a missing or foreign cache fails here, before any folder is created
    student_list = parse_students(students)
    slots = gpu_slots(devices)
    jobs = plan(cache, student_list, out, train_args, echo=click.echo)
    if not jobs:
        click.echo(f"[sweep] all {len(student_list)} students finished; nothing to do (report: kdcache report {out} --eval-cache VAL_CACHE)")
        return
    run_jobs(jobs, slots, echo=click.echo)
    failed = [job for job in jobs if job.returncode != 0]
    if failed:
        names = ", ".join(f"{job.name} (exit {job.returncode})" for job in failed)
        raise KdcacheError(
            f"{len(failed)} of {len(jobs)} students failed: {names}; fix the cause shown above and re-run the same "
            "sweep command (finished students are skipped)")
    click.echo(f"[sweep] {len(jobs)} trained, {len(student_list) - len(jobs)} skipped; "
               f"next: kdcache report {out} --eval-cache VAL_CACHE")
