"""`kdcache report`: evaluate a sweep's students on a held-out cache; write report.md and report.png."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from ..cache.files import atomic_write_bytes, atomic_write_json
from ..cache.manifest import read_manifest
from ..cache.schema import describe_targets, kind_of, targets_of
from ..cache.storage import is_remote, location
from ..errors import KdcacheError
from .amortise import amortisation, cache_tokens
from .answers import (ANSWERS_JSON, Answerer, chat_tokenizer, check_lengths, echo_lines, position_limit,
                      read_prompts, render, side_by_side)
from .answers import markdown as answers_markdown
from .collect import EVAL_RECORD, evaluate_dir, find_runs, train_cache
from .flags import curve_flags, majority_rates, run_flags
from .runs import SWEEP_RECORD, read_json
from .plot import plot_report
from .table import markdown_table

REPORT_MD = "report.md"
REPORT_PNG = "report.png"
TEACHER_EVAL_RECORD = "teacher_eval.json"
MODE_ORDER = {"cached KD": 0, "online KD": 1, "hard labels": 2}


def teacher_dir(manifest: dict, override: Path | None) -> Path | None:
    """A teacher folder `kdcache evaluate` can load: --teacher, else the cache's teacher if it is a model dir.
    A .gguf --teacher answers prompts (--answers) but is not evaluated: its row comes from the cache."""
    if override is not None:
        if Path(override).is_file() and Path(override).suffix == ".gguf":
            return None
        if not (Path(override) / "config.json").is_file():
            raise KdcacheError(f"--teacher {override} is not a model directory (no config.json) or a .gguf file; "
                               "pass the teacher's save_pretrained folder")
        return Path(override)
    teacher = manifest.get("teacher") or {}
    source = teacher.get("source")
    if source and not teacher.get("gguf_file") and (Path(source) / "config.json").is_file():
        return Path(source)
    return None


def check_same_teacher(train_manifest: dict, train_dir, eval_manifest: dict, eval_dir) -> None:
    """A held-out cache from another teacher or tokenizer would make every number in the report meaningless."""
    for key, sub in (("teacher", "weights_sha256"), ("tokenizer", "sha256")):
        a, b = (train_manifest.get(key) or {}).get(sub), (eval_manifest.get(key) or {}).get(sub)
        if a and b and a != b:
            raise KdcacheError(
                f"--eval-cache {eval_dir} was made with another {key} than the students' cache {train_dir} "
                f"({key}.{sub} differs); dump the held-out text with the same teacher")


def teacher_row(manifest: dict, runs, metrics: dict | None) -> dict:
    """The teacher's line: its own evaluation when it could run, else what the eval cache itself says."""
    teacher = manifest.get("teacher") or {}
    row = {"name": "teacher", "mode": f"teacher ({teacher.get('model_type') or 'model'})",
           "num_parameters": teacher.get("num_parameters"),
           "tokens_per_second": (manifest.get("dump") or {}).get("tokens_per_second")}
    if metrics is not None:
        row.update({k: v for k, v in metrics.items() if not k.startswith("teacher_")})
        return row
    # Cache-only: the teacher agrees with itself; its accuracy is stored with every student's evaluation.
    row.update({"kl": 0.0, "top1_agreement": 1.0})
    for run in runs:
        for key in ("accuracy", "perplexity"):
            if row.get(key) is None and run.metrics.get(f"teacher_{key}") is not None:
                row[key] = run.metrics[f"teacher_{key}"]
    return row


@click.command("report")
@click.argument("runs_dir", metavar="RUNS", type=click.Path())
@click.option("--eval-cache", required=True, type=click.Path(),
              help="Held-out cache to evaluate on (same teacher and tokenizer as the training cache, other text): "
                   "a folder or an s3:// (gs://, hdfs://) URI.")
@click.option("--teacher", "teacher_override", type=click.Path(path_type=Path), default=None,
              help="Teacher model dir for the teacher row, or a .gguf file (then it only answers --answers prompts) "
                   "[default: the eval cache's teacher].")
@click.option("--teacher-eval/--no-teacher-eval", default=True, show_default=True,
              help="Evaluate the teacher itself for its row (else: its accuracy from the cache only).")
@click.option("--fresh", is_flag=True, help="Re-evaluate every student even if RUNS/<name>/eval.json is current.")
@click.option("--answers", "answers_file", type=click.Path(path_type=Path), default=None, metavar="PROMPTS.jsonl",
              help='Add side-by-side answers: the teacher\'s and each student\'s greedy reply to every prompt in this file, '
                   'one {"messages": [{"role": "user", "content": "..."}]} per line (causal LMs with a chat template).')
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Longest reply for --answers, in tokens.")
def report_cmd(runs_dir: Path, eval_cache: str, teacher_override: Path | None, teacher_eval: bool, fresh: bool,
               answers_file: Path | None, max_new_tokens: int):
    """Evaluate every student of a sweep and write RUNS/report.md and RUNS/report.png.

    The table has one row per finished student (parameters, train tokens/s, KL to the teacher,
    top-1 agreement, accuracy, perplexity for LMs) and the teacher's row; the plot shows the
    headline metric against student size with the teacher as a line. The report also states the
    amortisation: the measured one-time teacher pass vs the teacher time online KD would spend.
    Evaluations are kept in RUNS/<name>/eval.json, so re-running after adding a student is quick.
    With --answers, the report also shows the teacher's and every student's greedy reply to a few
    held-out prompts side by side (RUNS/answers.json holds them all).

    \b
    Example:
      kdcache report runs/sweep --eval-cache runs/eval-cache
      kdcache report runs/sweep --eval-cache runs/eval-cache --answers prompts.jsonl --max-new-tokens 64
    """
    if is_remote(runs_dir):  # a sweep folder is local (see `kdcache sweep --out`): never a folder named "s3:"
        raise KdcacheError(f"report {runs_dir}: RUNS must be a local sweep folder; copy it from the bucket first")
    runs_dir = Path(runs_dir)
    eval_cache = location(eval_cache)  # a folder, or an object-store prefix kept as a URI
    runs, unfinished = find_runs(runs_dir)
    eval_manifest = read_manifest(eval_cache)
    if not eval_manifest.get("complete", True):
        raise KdcacheError(f"eval cache {eval_cache} is incomplete; finish it by re-running its `kdcache dump-logits` command")
    task = eval_manifest.get("task")
    prompts = tokenizer = None
    if answers_file is not None:  # every check on the prompts before the slow evaluations
        if task != "clm":
            raise KdcacheError(f"--answers needs causal-LM students; the eval cache {eval_cache} is a {task} cache")
        from ..cache.stream import open_cache  # imports torch: only when needed

        prompts = read_prompts(answers_file)
        tokenizer = chat_tokenizer(open_cache(eval_cache).tokenizer_dir)
        check_lengths(prompts, [render(tokenizer, m) for m in prompts],
                      answer_limits(runs, eval_manifest, teacher_override), max_new_tokens=max_new_tokens)

    caches = Counter(str(c) for c in (train_cache(r) for r in runs if r.mode == "cached KD") if c)
    train_manifest = None
    if caches:
        train_cache_dir = location(caches.most_common(1)[0][0])
        try:
            train_manifest = read_manifest(train_cache_dir)
        except KdcacheError as e:
            click.echo(f"[report] no amortisation: {e}", err=True)
        else:
            check_same_teacher(train_manifest, train_cache_dir, eval_manifest, eval_cache)

    for run in runs:
        click.echo(f"[report] evaluating {run.name} on {eval_cache}")
        run.metrics = evaluate_dir(run.path, eval_cache, run.path / EVAL_RECORD, fresh=fresh)
    amort = amortisation(train_manifest, runs, cache_tokens(train_cache_dir)) if train_manifest is not None else None

    teacher_metrics = None
    tdir = teacher_dir(eval_manifest, teacher_override) if teacher_eval else None
    if tdir is not None:
        click.echo(f"[report] evaluating the teacher {tdir}")
        teacher_metrics = evaluate_dir(tdir, eval_cache, Path(runs_dir) / TEACHER_EVAL_RECORD, fresh=fresh)
    teacher = teacher_row(eval_manifest, runs, teacher_metrics)

    use_ppl = task in ("mlm", "clm") and any(r.metrics.get("perplexity") is not None for r in runs)
    from ..train.evaluate import token_scope  # here: `kdcache report --help` should not load torch

    scope = token_scope(eval_manifest)  # "assistant-token" on chat caches
    metric, label = ("perplexity", "held-out perplexity (lower is better)") if use_ppl else (
        "accuracy", "held-out accuracy (higher is better)")
    if scope:
        label = label.replace("held-out ", f"held-out {scope} ")
    majority = majority_rates(eval_cache)
    flags = [f for r in runs for f in run_flags(r, runs_dir, majority, teacher.get("accuracy"))]
    flags += curve_flags(runs, runs_dir, metric, skip={f.name for f in flags})

    rows = [{"name": r.name, "mode": r.mode, "num_parameters": r.num_parameters,
             "tokens_per_second": r.tokens_per_second, **r.metrics,
             "lr": (r.summary.get("args") or {}).get("lr"),
             "options": (read_json(r.path / SWEEP_RECORD) or {}).get("options"),
             "flag": ", ".join(f.kind for f in flags if f.name == r.name) or None} for r in runs]
    rows.sort(key=lambda r: (r.get("num_parameters") or 0, MODE_ORDER.get(r["mode"], 9), r["name"]))
    table = markdown_table(rows + [teacher])
    png = plot_report(rows, teacher, metric, label, Path(runs_dir) / REPORT_PNG)

    teacher_info = eval_manifest.get("teacher") or {}
    totals = eval_manifest.get("totals") or {}
    md = [
        f"# kdcache report: `{runs_dir}`",
        "",
        f"Task `{task}`; teacher `{teacher_info.get('source')}`"
        + (f" ({teacher_info['gguf_file']})" if teacher_info.get("gguf_file") else "")
        + f"; held-out cache `{eval_cache}` ({totals.get('rows', '?')} rows, {totals.get('positions', '?')} target positions, "
          f"{describe_targets(eval_manifest)} targets).",
        "",
        table,
        "",
        "Modes: *cached KD* trained from the cache; *online KD* had the teacher in the loop (full softmax); "
        "*hard labels* used no teacher (alpha 0). KL is KL(teacher ‖ student) "
        + ("over the teacher's stored top-k ids; " if not kind_of(targets_of(eval_manifest)["kind"]).draws else
           "over the whole vocabulary, estimated without bias from the held-out cache's sampled ids; ")
        + "train tokens/s is the student's training throughput (the teacher row: its dump throughput)."
        + ("" if teacher_metrics is not None else " The teacher row's KL and agreement are 0 and 1 by definition "
           "(the teacher was not re-evaluated)."),
    ]
    if scope:
        md += ["", f"Chat cache: every metric is {scope} (the positions whose next token is the assistant's, "
               "its end-of-turn marker included), each model seeing the whole conversation before it."]
    if unfinished:
        md += ["", "Not in the table (unfinished): " + ", ".join(f"`{p.name}`" for p in unfinished) + "."]
    md += ["", "## Flags", ""]
    md += [f.markdown() for f in flags] or [
        f"None: every student's training loss fell, none collapsed to one answer, and {metric} improves with size "
        "among students trained the same way."]
    if amort is not None:
        md += ["", "## Amortisation", ""] + [f"- {line}" for line in amort.lines()]
    md += ["", f"![{label} vs student parameters]({REPORT_PNG})", ""]
    answers = None
    if prompts is not None:
        answers = side_by_side(prompts, answerers(rows, runs, teacher, eval_manifest, teacher_override), tokenizer,
                               max_new_tokens=max_new_tokens, echo=lambda line: click.echo(line))
        atomic_write_json(Path(runs_dir) / ANSWERS_JSON, answers)
        md += answers_markdown(answers, str(answers_file)) + [""]
    atomic_write_bytes(Path(runs_dir) / REPORT_MD, "\n".join(md).encode())

    click.echo("")
    click.echo(table)
    for flag in flags:
        click.echo(f"[report] flag: {flag.text()}")
    if amort is not None:
        click.echo("")
        for line in amort.lines():
            click.echo(line.replace("**", ""))
    if answers is not None:
        click.echo("")
        for line in echo_lines(answers):
            click.echo(line)
    click.echo(f"\nwrote {Path(runs_dir) / REPORT_MD} and {png}" + (f" and {Path(runs_dir) / ANSWERS_JSON}" if answers else ""))


def answer_limits(runs, manifest: dict, override: Path | None) -> dict[str, int | None]:
    """Each answering model's position limit from its config.json, read before any model is loaded."""
    from ..train.students import teacher_source

    limits = {}  # in the answerers' order: on a tie the first is named
    folder, _ = teacher_source(manifest, override)
    if folder is not None and Path(folder).is_dir():
        limits["teacher"] = position_limit(folder)
    return limits | {r.name: position_limit(r.path) for r in runs}


def answerers(rows: list[dict], runs, teacher: dict, manifest: dict, override: Path | None) -> list[Answerer]:
    """The teacher (when it can be loaded) then every student, in the table's order."""
    import torch

    from ..dump.teacher import load_teacher
    from ..models import auto_class
    from ..train.students import load_pretrained, teacher_source

    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = {r.name: r.path for r in runs}
    out = []
    folder, gguf = teacher_source(manifest, override)
    if folder is not None:
        source = str(Path(folder) / gguf) if gguf and Path(folder).is_dir() else folder
        out.append(Answerer("teacher", teacher["mode"], lambda: load_teacher(source, task="clm", dtype=torch.float32,
                                                                             device=device).model,
                            optional=override is None))
    for r in rows:
        out.append(Answerer(r["name"], r["mode"], lambda path=paths[r["name"]]: load_pretrained(
            auto_class("clm"), path, dtype=torch.float32).to(device).eval()))
    return out
