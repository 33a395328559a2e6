"""What the report warns about: students whose numbers should not be trusted as points on the
size curve (diverged, loss flat, predictions collapsed) and curves where a larger student is worse
than a smaller one. Each flag names the likely cause and a command to retry.

The usual cause of all of these is one learning rate for every size (a rate that suits a narrow
student overshoots a wide post-LN one), so the retry is the same student at a lower rate, in a new
folder of the same sweep; a larger student that trained at a lower rate than a smaller one is more
likely short of steps.
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


def majority_rates(eval_cache: Path) -> tuple[float | None, float | None]:
    """(share of the most common label, share of the teacher's most common top-1) on a cache:
    what a student that always predicts one class / one token scores."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..cache.schema import LABELS, SHARD_DIR, TOPK_IDS

    labels, top1 = {}, {}
    for shard in sorted((Path(eval_cache) / SHARD_DIR).glob("*.parquet")):
        table = pq.read_table(shard, columns=[LABELS, TOPK_IDS])
        for counts, values in ((labels, pc.list_flatten(table.column(LABELS))),
                               (top1, pc.list_element(pc.list_flatten(table.column(TOPK_IDS)), 0))):
            for item in pc.value_counts(values).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    labels.pop(-1, None)  # unknown labels

    def share(counts):
        return max(counts.values()) / sum(counts.values()) if counts else None
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


def retry_command(run, runs_dir: Path, lr: float | None = None, max_steps: int | None = None) -> str:
    """The same student with a new rate (or more steps), into a new folder of the same sweep."""
    summary_args = run.summary.get("args") or {}
    spec = (run.summary.get("student") or {}).get("spec") or summary_args.get("student")
    record = read_json(run.path / SWEEP_RECORD)
    suffix = f"lr{_fmt_lr(lr)}" if lr is not None else f"steps{max_steps}"
    new_name = f"{run.name}-{suffix}"
    options = (f":lr={_fmt_lr(lr)}" if lr is not None else "") + (f":max-steps={max_steps}" if max_steps else "")
    if record is None:  # trained by train-student directly
        return (f"kdcache train-student --cache {shlex.quote(str(run.summary.get('cache')))} --student {spec} "
                f"--out {shlex.quote(str(Path(runs_dir) / new_name))} --lr {_fmt_lr(lr or summary_args.get('lr'))}"
                + (f" --max-steps {max_steps}" if max_steps else "") + " (and its other options)")
    identity = record.get("identity") or {}
    drop = ("--lr",) + (("--max-steps", "--epochs") if max_steps else ())
    rest = without_options(identity.get("train_args") or [], drop)
    return " ".join(["kdcache sweep", "--cache", shlex.quote(str(identity.get("cache"))), "--out",
                     shlex.quote(str(runs_dir)), "--students", shlex.quote(f"{new_name}={spec}{options}"),
                     *(shlex.quote(a) for a in rest)])


def run_flags(run, runs_dir: Path, majority: tuple[float | None, float | None]) -> list[Flag]:
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
                     retry_command(run, runs_dir, lr=lr / 10) if lr else "a lower --lr")]
    flags = []
    label_share, top1_share = majority
    accuracy, agreement = metrics.get("accuracy"), metrics.get("top1_agreement")
    # Always answering one class/token scores at most the majority rates; a student that does no better on both
    # accuracy and agreement with the teacher has learnt nothing but the most common answer.
    if (label_share is not None and accuracy is not None and agreement is not None and top1_share is not None
            and accuracy <= label_share + COLLAPSE_MARGIN
            and agreement <= top1_share + COLLAPSE_MARGIN):
        flags.append(Flag(
            run.name, "collapsed", f"predictions collapsed to one class/token: accuracy {accuracy:.2%} is no better than the majority rate "
                      f"({label_share:.2%}) and top-1 agreement {agreement:.2%} no better than always answering the "
                      f"teacher's most common top-1 ({top1_share:.2%})",
            f"a learning rate too high for its width {where} (or too few steps to leave the majority answer)".strip(),
            retry_command(run, runs_dir, lr=lr / 3) if lr else "a lower --lr"))
    if len(losses) >= 2 and losses[-1] > (1 - LOSS_FALL_MIN) * losses[0]:
        # A loss that rose on the way is being thrown around by too large steps; one that crept down
        # smoothly but barely is moving too slowly.
        too_high = max(losses) > (1 + LOSS_FALL_MIN) * losses[0]
        flags.append(Flag(
            run.name, "loss did not fall", f"training loss did not fall ({losses[0]:.4g} at the first log line, "
                                           f"{losses[-1]:.4g} at the last, {max(losses):.4g} at most)",
            f"a learning rate too {'high' if too_high else 'low'} to make progress {where}".strip(),
            (retry_command(run, runs_dir, lr=lr / 3 if too_high else lr * 10) if lr
             else f"a {'lower' if too_high else 'higher'} --lr")))
    if not flags and run.summary.get("loss_warnings"):
        flags.append(Flag(run.name, "training warning", "train-student warned while training: " + " / ".join(run.summary["loss_warnings"]),
                          f"see the warning {where}".strip(),
                          retry_command(run, runs_dir, lr=lr / 3) if lr else "a lower --lr"))
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
            steps = int(run.summary.get("total_steps") or run.summary.get("steps") or 0)
            flags.append(Flag(run.name, "worse than smaller", problem,
                              f"too few steps for its size at its lower learning rate ({_fmt_lr(lr)} vs {_fmt_lr(best_lr)})",
                              retry_command(run, runs_dir, max_steps=2 * steps) if steps else "more --max-steps"))
        else:
            flags.append(Flag(run.name, "worse than smaller", problem,
                              f"a learning rate too high for its width (lr {_fmt_lr(lr)}; `{best.name}` had "
                              f"{_fmt_lr(best_lr)}): wider students need smaller steps (sweep --lr-rule width)"
                              if lr else "its learning rate does not suit its size",
                              retry_command(run, runs_dir, lr=lr / 3) if lr else "a lower --lr"))
    return flags
