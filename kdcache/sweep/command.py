"""`kdcache sweep`: train several students from one cache, each into RUNS/<name>/, resumably."""
from __future__ import annotations

from pathlib import Path

import click

from ..cache.manifest import read_manifest
from ..cache.storage import ObjectPath, is_remote, location
from ..errors import KdcacheError
from .launcher import Job, gpu_slots, run_jobs
from .lr_rule import BASE_LR, BASE_WIDTH, RULES, default_rule, student_lr
from .runs import (
    TRAIN_LOG, TRAIN_SUMMARY, check_or_record, has_flag, has_progress, is_finished, option_value,
    training_identity, without_options,
)
from .specs import SWEEP_OWNED_OPTIONS, check_train_args, parse_students


def student_args(student, train_args: list[str], lr_rule: str):
    """(this student's train-student options, its learning rate): the sweep's options with the
    student's own `:option=value` ones in place of the same options, and its rate appended."""
    value_options = tuple(o for o, v in student.options if v is not None)
    own = [*without_options(train_args, value_options), *student.option_args()]
    lr = student_lr(lr_rule, student.spec, own, option_value(student.option_args(), "--lr"))
    if lr.by_rule:  # else `own` already says it (and records of runs made before the rule stay valid)
        own = [*without_options(own, ("--lr",)), *lr.args()]
    return own, lr


def plan(cache: Path | ObjectPath, students, out: Path, train_args: list[str], echo=print, lr_rule: str | None = None) -> list[Job]:
    """One job per student still to train; finished students are skipped, interrupted ones resumed."""
    lr_rule = lr_rule or default_rule(train_args)
    jobs = []
    for student in students:
        run_dir = out / student.name
        args, lr = student_args(student, train_args, lr_rule)
        extra = {"lr": lr.value, "lr_source": lr.source, "options": student.option_text() or None}
        check_or_record(run_dir, training_identity(cache, student, args), extra, echo=echo)
        if is_finished(run_dir):
            echo(f"[sweep] {student.name}: finished already ({run_dir / TRAIN_SUMMARY}), skipped")
            continue
        resume = has_progress(run_dir)
        rate = f"lr {lr.value:.3g} ({lr.source})" if lr.value is not None else "lr: train-student default"
        options = f"; options {student.option_text()}" if student.options else ""
        echo(f"[sweep] {student.name}: {'resuming' if resume else 'training'} {student.spec}, {rate}{options} -> {run_dir}")
        argv = ["train-student", "--cache", str(cache), "--student", student.spec, "--out", str(run_dir),
                *args, *(["--resume"] if resume else [])]
        jobs.append(Job(student.name, argv, run_dir / TRAIN_LOG))
    return jobs


@click.command(
    "sweep",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any other option is passed unchanged to every `kdcache train-student` run "
           "(e.g. --max-steps 500 --batch-size 32 --alpha 0.5 --temperature 2; see `kdcache train-student --help`); "
           "a student's own :option=value wins over it.",
)
@click.option("--cache", "cache", required=True, type=click.Path(),
              help="The cache every student trains from (the --out of `kdcache dump-logits`), or its s3:// "
                   "(gs://, hdfs://) URI.")
@click.option("--students", required=True,
              help="Comma-separated student specs: presets like L2-H128,L4-H256, config.json files or model dirs. "
                   "NAME=SPEC names a run folder (e.g. hard=L2-H128); SPEC:option=value sets any train-student "
                   "option for that student only (e.g. big=L4-H256:lr=3e-4:batch-size=16).")
@click.option("--out", "out", required=True, type=click.Path(),
              help="Sweep folder: each student trains into OUT/<name>/ (a local folder).")
@click.option("--gpus", "devices", default="auto", show_default=True,
              help="auto: one student per visible GPU at a time when there are two or more, else one after another; "
                   "'0,1': those GPUs; cpu: one after another.")
@click.option("--lr-rule", type=click.Choice(RULES), default=None,
              help=f"Each student's learning rate. width: lr = base x {BASE_WIDTH}/hidden size (base: --lr, else "
                   f"{BASE_LR:g}), so wider students take smaller steps; none: --lr (or train-student's default) for "
                   "every student. [default: width, or none when --lr is given: an explicit --lr means what it says] "
                   "A student's own :lr=... always wins.")
@click.pass_context
def sweep_cmd(ctx, cache: str, students: str, out: Path, devices: str, lr_rule: str | None):
    """Train several students from the same cache, each into its own folder.

    One learning rate is not fair to every size: by default each student gets base x 128/width
    (--lr-rule), and any student can carry its own options (SPEC:lr=3e-4). Each run's rate and
    options are in its train_summary.json and in the report.

    Re-running the same command resumes the sweep: students whose train_summary.json says done
    are skipped, interrupted ones continue from their last checkpoint (train-student --resume),
    and a folder trained with different options is refused rather than mixed (unless it never
    completed a step: a failed start is simply replaced).

    \b
    Example:
      kdcache sweep --cache runs/cache --students L2-H128,L4-H256 --out runs/sweep --max-steps 300
      kdcache sweep ... --students L2-H128,big=L4-H256:lr=3e-4:batch-size=16
      kdcache report runs/sweep --eval-cache runs/eval-cache
    """
    train_args = list(ctx.args)
    if is_remote(out):  # never a local folder named "s3:"
        raise KdcacheError(f"sweep --out {out}: a sweep's folder must be local (its runs keep logs and records there "
                           "while students train); use a local --out and copy it up when done, or train single "
                           "students with `kdcache train-student --out s3://...`")
    out = Path(out)
    for option in SWEEP_OWNED_OPTIONS:
        if has_flag(train_args, option):
            raise KdcacheError(f"sweep sets {option} for each student itself; drop it from the command line")
    check_train_args(train_args)
    cache = location(cache)  # a folder, or an object-store prefix kept as a URI
    read_manifest(cache)  # a missing or foreign cache fails here, before any folder is created
    student_list = parse_students(students)
    slots = gpu_slots(devices)
    jobs = plan(cache, student_list, out, train_args, echo=click.echo, lr_rule=lr_rule)
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
