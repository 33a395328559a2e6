"""What the report warns about: students whose numbers should not be trusted as points on the
size curve (diverged, loss flat, predictions collapsed) and curves where a larger student is worse
than a smaller one. Each flag names the likely cause and a command to retry.

The usual cause of all of these is a learning rate that does not fit the student's width and the
run's budget: one rate for every size overshoots a wide post-LN student, and a low rate in a short
run never leaves the majority answer. One run cannot always tell which, so where it cannot the retry
is one sweep command training the same student at a third and at three times its rate, each into a
new folder of the same sweep; a diverged student is retried at a tenth.
"""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from .runs import SWEEP_RECORD, read_json, without_options

COLLAPSE_MARGIN = 0.01     # accuracy / agreement within 1 point of always predicting the most common one
LOSS_FALL_MIN = 0.05       # the last logged training loss must be at least 5 % below the first
CURVE_MARGIN = {"accuracy": 0.005, "perplexity": 0.01}  # 0.5 points of accuracy; 1 % of perplexity


@dataclass
class Flag:
    name: str       # the run
    kind: str       # a word or two for the table's flag column
    problem: str
    cause: str
    retry: str      # a command

    def markdown(self) -> str:
        return f"- **`{self.name}`**: {self.problem}. Likely cause: {self.cause}. Retry: `{self.retry}`"

    def text(self) -> str:
        return f"{self.name}: {self.problem}. Likely cause: {self.cause}. Retry: {self.retry}"


def majority_rates(eval_cache) -> tuple[float | None, float | None]:
    """(share of the most common label, share of the teacher's most common top-1) on a cache:
    what a student that always predicts one class / one token scores.

    Read through the cache's own stream, so every target kind counts the teacher's top-1 the way
    `evaluate` does (first stored id: the top-k head's best, or for `sample` the most probable draw),
    and paths, checksums and buckets are handled as for training."""
    import numpy as np

    from ..cache.stream import CacheStream

    label_parts, top1_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in CacheStream(eval_cache, batch_size=256, shuffle=False):
        label_parts.append(batch["labels"].numpy())
        top1_parts.append(batch["target_ids"][:, 0].numpy().astype(np.int64))
    labels, top1 = np.concatenate(label_parts), np.concatenate(top1_parts)

    def share(values):
        values = values[values >= 0]  # -1: unknown label
        return float(np.bincount(values).max() / len(values)) if len(values) else None
    return share(labels), share(top1)


def logged_losses(run_dir: Path) -> list[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [float(json.loads(line)["loss"]) for line in path.read_text().splitlines() if line.strip()]


def _finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def _fmt_lr(lr: float) -> str:
    return f"{lr:.2g}"


def retry_command(run, runs_dir: Path, lrs: list[float]) -> str:
    """The same student at the given rates, each into a new folder of the same sweep (one command).

    Two rates bracket the old one where one run cannot tell "too high" from "too few steps"."""
    summary_args = run.summary.get("args") or {}
    spec = (run.summary.get("student") or {}).get("spec") or summary_args.get("student")
    record = read_json(run.path / SWEEP_RECORD)
    if record is None:  # trained by train-student directly
        return " ; ".join(
            f"kdcache train-student --cache {shlex.quote(str(run.summary.get('cache')))} --student {spec} "
            f"--out {shlex.quote(str(Path(runs_dir) / f'{run.name}-lr{_fmt_lr(lr)}'))} --lr {_fmt_lr(lr)} "
            "(and its other options)" for lr in lrs)
    identity = record.get("identity") or {}
    students = ",".join(f"{run.name}-lr{_fmt_lr(lr)}={spec}:lr={_fmt_lr(lr)}" for lr in lrs)
    rest = without_options(identity.get("train_args") or [], ("--lr",))
    return " ".join(["kdcache sweep", "--cache", shlex.quote(str(identity.get("cache"))), "--out",
                     shlex.quote(str(runs_dir)), "--students", shlex.quote(students), *(shlex.quote(a) for a in rest)])


def _retry(run, runs_dir: Path, lr, factors: tuple[float, ...], fallback: str) -> str:
    return retry_command(run, runs_dir, [lr * f for f in factors]) if lr else fallback


def run_flags(run, runs_dir: Path, majority: tuple[float | None, float | None],
              teacher_accuracy: float | None = None) -> list[Flag]:
    """Flags about one student on its own: diverged, training loss flat, predictions collapsed."""
    lr = (run.summary.get("args") or {}).get("lr")
    metrics = run.metrics
    losses = logged_losses(run.path)
    where = f"at lr {_fmt_lr(lr)}" if lr else ""
    kl, k = metrics.get("kl"), metrics.get("k")
    what = None
    if not all(math.isfinite(x) for x in losses):
        what = "training loss went non-finite"
    elif not all(_finite(metrics.get(key)) for key in ("kl", "perplexity")):
        what = "its held-out KL or perplexity is not finite"
    elif kl is not None and k and k > 1 and kl > 2 * math.log(k):
        # A uniform guess over the teacher's k stored ids has KL <= ln k; twice that is far worse than no model
        # (the factor 2 leaves room for an overconfident but working classifier).
        what = (f"held-out KL {kl:.3g} is more than twice a uniform guess's (at most ln {k} = {math.log(k):.3g}): "
                "its outputs blew up")
    if what is not None:
        return [Flag(run.name, "diverged", what, f"the learning rate is too high for this student {where}".strip(),
                     _retry(run, runs_dir, lr, (0.1,), "a lower --lr"))]
    flags = []
    label_share, top1_share = majority
    accuracy, agreement = metrics.get("accuracy"), metrics.get("top1_agreement")
    # Always answering one class/token scores at most the majority rates; a student that does no better on both
    # accuracy and agreement with the teacher has learnt nothing but the most common answer.
    if (label_share is not None and accuracy is not None and agreement is not None and top1_share is not None
            and accuracy <= label_share + COLLAPSE_MARGIN
            and agreement <= top1_share + COLLAPSE_MARGIN):
        weak_teacher = teacher_accuracy is not None and teacher_accuracy <= label_share + COLLAPSE_MARGIN
        cause = (f"a learning rate that does not fit its width and this budget{' (' + where + ')' if where else ''}: too "
                 "high, and a wide student overshoots into the majority answer; too low (or too few steps), and it never "
                 "leaves it")
        if weak_teacher:  # nothing a student setting can fix: it learnt what the teacher says
            cause = (f"the teacher itself is no better than the majority answer (its accuracy {teacher_accuracy:.2%}), so "
                     "agreeing with it means answering its most common top-1: the fix is a stronger teacher (a new cache); "
                     "other rates only check the student")
        flags.append(Flag(
            run.name, "collapsed", f"predictions collapsed to one class/token: accuracy {accuracy:.2%} is no better than the majority rate "
                      f"({label_share:.2%}) and top-1 agreement {agreement:.2%} no better than always answering the "
                      f"teacher's most common top-1 ({top1_share:.2%})",
            cause, _retry(run, runs_dir, lr, (1 / 3, 3), "another --lr (lower and higher)")))
    if len(losses) >= 2 and losses[-1] > (1 - LOSS_FALL_MIN) * losses[0]:
        # A loss that crept down smoothly but barely is moving too slowly; one that rose on the way may be
        # thrown around by too large steps, or just be noisy early in a short run: try both sides.
        rose = max(losses) > (1 + LOSS_FALL_MIN) * losses[0]
        flags.append(Flag(
            run.name, "loss did not fall", f"training loss did not fall ({losses[0]:.4g} at the first log line, "
                                           f"{losses[-1]:.4g} at the last, {max(losses):.4g} at most)",
            (f"a learning rate too high ({where}: the loss rose on the way), or too few steps at it to make progress"
             if rose else f"a learning rate too low to make progress ({where}: the loss crept down smoothly)"),
            _retry(run, runs_dir, lr, (1 / 3, 3) if rose else (10,), "another --lr")))
    if not flags and run.summary.get("loss_warnings"):
        flags.append(Flag(run.name, "training warning", "train-student warned while training: " + " / ".join(run.summary["loss_warnings"]),
                          f"see the warning {where}".strip(),
                          _retry(run, runs_dir, lr, (1 / 3,), "a lower --lr")))
    return flags


def curve_flags(runs, runs_dir: Path, metric: str, skip: set[str]) -> list[Flag]:
    """A student larger than another of the same kind (mode, initialisation) but worse on `metric`."""
    lower_is_better = metric == "perplexity"
    margin = CURVE_MARGIN.get(metric, 0.005)

    def kind(run):
        return run.mode, bool((run.summary.get("args") or {}).get("init_from_teacher"))

    def worse(a, b):  # is value a worse than b by more than the margin?
        return a > b * (1 + margin) if lower_is_better else a < b - margin

    points = [r for r in runs if r.name not in skip and r.num_parameters and _finite(r.metrics.get(metric))
              and r.metrics.get(metric) is not None]
    flags = []
    for run in points:
        smaller = [s for s in points if kind(s) == kind(run) and s.num_parameters < run.num_parameters
                   and worse(run.metrics[metric], s.metrics[metric])]
        if not smaller:
            continue
        best = (min if lower_is_better else max)(smaller, key=lambda s: s.metrics[metric])
        fmt = "{:,.2f}" if lower_is_better else "{:.2%}"
        lr, best_lr = ((r.summary.get("args") or {}).get("lr") for r in (run, best))
        problem = (f"larger than `{best.name}` ({best.num_parameters:,} vs {run.num_parameters:,} parameters) but worse: "
                   f"{metric} {fmt.format(run.metrics[metric])} vs {fmt.format(best.metrics[metric])}")
        if lr and best_lr and lr < best_lr:
            cause = (f"too few steps for its size at its lower learning rate ({_fmt_lr(lr)} vs {_fmt_lr(best_lr)}), or a "
                     "rate still too high for its width")
        elif lr:
            cause = (f"a learning rate too high for its width (lr {_fmt_lr(lr)}; `{best.name}` had {_fmt_lr(best_lr)}): "
                     "wider students need smaller steps (sweep --lr-rule width), unless the budget is too short for them")
        else:
            cause = "its learning rate does not suit its size"
        flags.append(Flag(run.name, "worse than smaller", problem, cause,
                          _retry(run, runs_dir, lr, (1 / 3, 3), "another --lr (lower and higher)")))
    return flags
