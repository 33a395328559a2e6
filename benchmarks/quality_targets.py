"""Which soft targets, and how many bytes of them, does a student need to match online KD?

One student of a finished pipeline run, retrained from caches of the same teacher and corpus that
hold different targets (`top-k` at several k, `sample` at several N, `top-k+sample`), with the same
options, seed and data order, at one or more epoch counts over the cache; online full-vocabulary KD
and hard labels are trained the same way at each epoch count (the pipeline's own runs are reused
where they match). Everything is evaluated on the pipeline's held-out cache: perplexity over its
labels (so it does not depend on the training targets), top-1 agreement with the teacher, and the
expected calibration error of the student's next-token confidence (the teacher's, from the cache,
is printed under the table).

Needs a finished pipeline run: `make quickstart` (pipeline 1) or `python3 pipelines/masked_lm.py --small`.

    python3 benchmarks/quality_targets.py --pipeline runs/causal_lm-small --student L2 \\
        --targets top-k:8,top-k:64,sample:16,top-k+sample:8:16 --epochs 1,3
    python3 benchmarks/quality_targets.py --pipeline runs/masked_lm-small --student L3-H384-init --targets top-k:64,sample:16

Target specs: `top-k:K`, `sample:N`, `top-k+sample:K:N`; `:counts` after a sampled spec (`sample:32:counts`)
dumps it with --no-draw-logprobs (format v3: the same student at T = 1, fewer bytes); `@F` after any of them
dumps with `--select-positions F` (e.g. `top-k+sample:8:16@0.2`; its bytes / position are then per corpus
token), and `/WEIGHTING` after that trains the selected cache with `train-student --selection-weighting WEIGHTING`
(`top-k+sample:8:16@0.2/selected-only`; the cache is shared with the spec's other weightings). Caches and runs
are kept in --workdir and
reused, so an interrupted table resumes and a second call with more specs only adds rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train_common import REPO, command_line

# train-student options of the pipeline's run that are passed on unchanged
PASSED = ("batch_size", "lr", "weight_decay", "scheduler", "max_grad_norm", "temperature", "alpha",
          "tail", "seed", "num_workers", "shuffle_buffer")


@dataclass(frozen=True)
class Targets:
    kind: str
    k: int | None = None
    samples: int | None = None
    draw_logprobs: bool = True  # False: `:counts`, dumped with --no-draw-logprobs
    select: float | None = None  # --select-positions (token selection), None: every position
    weighting: str | None = None  # train-student --selection-weighting (selected caches), None: its default

    @classmethod
    def parse(cls, spec: str) -> "Targets":
        spec, _, weighting = spec.partition("/")
        if weighting and "@" not in spec:
            sys.exit(f"error: target spec {spec}/{weighting}: a weighting is for selected caches (@FRACTION)")
        return dataclasses.replace(cls._parse(spec), weighting=weighting or None)

    @classmethod
    def _parse(cls, spec: str) -> "Targets":
        spec, _, select = spec.partition("@")
        kind, _, rest = spec.partition(":")
        parts = [x for x in rest.split(":") if x]
        counts_only = kind != "top-k" and parts[-1:] == ["counts"]
        numbers = [int(x) for x in parts[:-1 if counts_only else None] if x.isdigit()]
        if len(numbers) != len(parts) - counts_only:
            numbers = []  # something else than numbers: refused below
        fraction = float(select) if select else None
        if kind == "top-k" and len(numbers) == 1:
            return cls(kind, k=numbers[0], select=fraction)
        if kind == "sample" and len(numbers) == 1:
            return cls(kind, samples=numbers[0], draw_logprobs=not counts_only, select=fraction)
        if kind == "top-k+sample" and len(numbers) == 2:
            return cls(kind, k=numbers[0], samples=numbers[1], draw_logprobs=not counts_only, select=fraction)
        sys.exit(f"error: target spec {spec!r}: use top-k:K, sample:N or top-k+sample:K:N (sampled ones with "
                 ":counts for --no-draw-logprobs), optionally @FRACTION")

    @classmethod
    def of_manifest(cls, manifest: dict) -> "Targets":
        from kdcache.cache.schema import targets_of
        t = targets_of(manifest)
        return cls(t["kind"], k=t["k"] or None, samples=t["samples"] or None, draw_logprobs=t["draw_logprobs"],
                   select=t.get("select_positions"))

    @property
    def label(self) -> str:
        label = {"top-k": f"top-{self.k}", "sample": f"sample N={self.samples}",
                 "top-k+sample": f"top-{self.k} + sample N={self.samples}"}[self.kind] \
            + ("" if self.draw_logprobs else ", counts only")
        if self.select is not None:
            label += f", soft at {self.select * 100:g} % of positions"
        return label if self.weighting is None else f"{label}, {self.weighting}"

    @property
    def slug(self) -> str:
        """The run's name."""
        return self.cache_slug if self.weighting is None else f"{self.cache_slug}-{self.weighting}"

    @property
    def cache_slug(self) -> str:
        slug = {"top-k": f"k{self.k}", "sample": f"s{self.samples}", "top-k+sample": f"k{self.k}s{self.samples}"}[self.kind] \
            + ("" if self.draw_logprobs else "c")
        return slug if self.select is None else f"{slug}-sel{self.select:g}"

    def dump_args(self) -> list:
        args = ["--targets", self.kind]
        if self.k is not None:
            args += ["--top-k", self.k]
        if self.samples is not None:
            args += ["--samples", self.samples]
        if not self.draw_logprobs:
            args.append("--no-draw-logprobs")
        if self.select is not None:
            args += ["--select-positions", self.select]
        return args


def kdcache(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"kdcache {args[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def complete(cache: Path) -> bool:
    manifest = cache / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def finished(run: Path) -> bool:
    summary = run / "train_summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("done"))


def evaluate(run: Path, eval_cache: Path) -> dict:
    """The run's held-out metrics, kept in RUN/eval.json exactly as `kdcache report` keeps them (so the
    pipeline's own evaluations are reused); re-evaluated when the record predates the ECE metric."""
    from kdcache.sweep.collect import EVAL_RECORD, evaluate_dir

    metrics = evaluate_dir(run, eval_cache, run / EVAL_RECORD)
    return metrics if "ece" in metrics else evaluate_dir(run, eval_cache, run / EVAL_RECORD, fresh=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=REPO / "runs" / "causal_lm-small")
    ap.add_argument("--student", default="L2", help="run name in PIPELINE/runs whose student and options are reused")
    ap.add_argument("--targets", default="top-k:8,top-k:16,top-k:64,top-k:256,sample:16,sample:64,top-k+sample:8:16",
                    help="comma-separated target specs to dump and train")
    ap.add_argument("--epochs", default=None,
                    help="comma-separated epoch counts over the cache [default: the pipeline run's own length]")
    ap.add_argument("--no-baselines", action="store_true", help="skip online KD and hard labels")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "quality_targets")
    args = ap.parse_args()

    runs, eval_cache, train_cache = args.pipeline / "runs", args.pipeline / "eval-cache", args.pipeline / "cache"
    base = json.loads((runs / args.student / "train_summary.json").read_text())
    options, manifest = base["args"], json.loads((train_cache / "manifest.json").read_text())
    teacher = manifest["teacher"]["source"]
    pipeline_targets = Targets.of_manifest(manifest)
    train = [x for key in PASSED for x in (f"--{key.replace('_', '-')}", options[key])]
    train += ["--student", options["student"], "--no-progress"] + (["--init-from-teacher"] if options.get("init_from_teacher") else [])
    for flag, key in (("--layers", "layers"), ("--hidden", "hidden"), ("--heads", "heads"), ("--intermediate", "intermediate")):
        if options["sizes"].get(key) is not None:
            train += [flag, options["sizes"][key]]
    own_length = ["--epochs", options["epochs"]] if options.get("epochs") else ["--max-steps", options["max_steps"]]
    lengths = ([("pipeline", own_length)] if args.epochs is None
               else [(f"{e:g}", ["--epochs", e]) for e in (float(x) for x in args.epochs.split(","))])
    dump = ["--teacher", teacher, "--task", manifest["task"], "--max-length", manifest["max_length"],
            "--data", manifest["data"]["source"], "--seed", manifest["seed"],
            "--batch-size", manifest["dump"]["batch_size"] or 8, "--no-progress"]
    if manifest.get("mask_copies"):
        dump += ["--mask-copies", manifest["mask_copies"], "--mlm-probability", manifest["mlm_probability"]]
    specs = [Targets.parse(s) for s in args.targets.split(",") if s]

    def pipeline_run(name: str, length: list) -> Path | None:
        """The pipeline's own run for this row, when it was trained for exactly this length."""
        run = runs / name
        if not finished(run):
            return None
        have = json.loads((run / "train_summary.json").read_text())["args"]
        same = (float(have.get("epochs") or 0) == float(length[1])) if length[0] == "--epochs" else have.get("max_steps") == length[1]
        return run if same else None

    def train_run(name: str, length: list, cache: Path, *extra) -> Path:
        run = args.workdir / f"{length[0].strip('-')}-{length[1]:g}" / name
        if not finished(run):
            print(f"[quality] training {name} ({' '.join(map(str, length))}) from {cache}", file=sys.stderr, flush=True)
            kdcache("train-student", "--cache", cache, "--out", run, *train, *length, *extra,
                    *(["--resume"] if (run / "checkpoint").is_dir() else []))
        return run

    rows = []  # (label, epochs label, run, cache or None)
    for length_label, length in lengths:
        if not args.no_baselines:
            run = pipeline_run(f"{args.student}-online", length) or train_run("online", length, train_cache,
                                                                              "--online-teacher", teacher)
            rows.append(("online full-vocabulary KD", length_label, run, None))
        for spec in specs:
            if spec == pipeline_targets and (run := pipeline_run(args.student, length)):
                cache = train_cache
            else:
                cache = train_cache if spec == pipeline_targets else args.workdir / f"cache-{spec.cache_slug}"
                if not complete(cache):
                    print(f"[quality] dumping {spec.label} to {cache}", file=sys.stderr, flush=True)
                    kdcache("dump-logits", *dump, *spec.dump_args(), "--out", cache)
                run = train_run(spec.slug, length, cache,
                                *(["--selection-weighting", spec.weighting] if spec.weighting else []))
            rows.append((f"cached {spec.label}", length_label, run, cache))
        if not args.no_baselines:
            run = pipeline_run(f"{args.student}-hard", length) or train_run("hard", length, train_cache, "--alpha", 0)
            rows.append(("hard labels only", length_label, run, None))

    stats = {}
    print(f"# {command_line()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; student {options['student']}"
          f"{' (--init-from-teacher)' if options.get('init_from_teacher') else ''}; held-out cache {eval_cache}")
    print("| trained from | epochs | cache bytes / position | ids / position | held-out perplexity | vs online KD "
          "| top-1 agreement | ECE | train s | teacher s (dump) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    online = {}
    teacher_ece = None
    for label, length_label, run, cache in rows:
        m = evaluate(run, eval_cache)
        teacher_ece = m.get("teacher_ece", teacher_ece)
        if label.startswith("online"):
            online[length_label] = m["perplexity"]
        summary = json.loads((run / "train_summary.json").read_text())
        epochs = summary["args"].get("epochs") or f"{summary['steps']} steps"
        size = ids = dump_s = "—"
        if cache is not None:
            if cache not in stats:
                stats[cache] = json.loads(kdcache("inspect", cache, "--json"))
            s = stats[cache]
            size, ids = f"{s['bytes_per_position']:,.1f}", f"{s.get('mean_ids_per_position', s.get('k')):.1f}"
            dump_s = f"{json.loads((cache / 'manifest.json').read_text())['dump']['seconds']:.0f}"
        ref = online.get(length_label)
        gap = f"{(m['perplexity'] - ref) / ref:+.1%}" if ref and m.get("perplexity") and not label.startswith("online") else "—"
        metric = f"{m['perplexity']:,.1f}" if m.get("perplexity") is not None else "—"
        epochs = f"{epochs:g}" if isinstance(epochs, float) else epochs
        print(f"| {label} | {epochs} | {size} | {ids} | {metric} | {gap} | {m['top1_agreement']:.2%} | "
              f"{m['ece']:.4f} | {summary['seconds']:.0f} | {dump_s} |")
    if teacher_ece is not None:
        print(f"\nTeacher's ECE on the held-out cache (its stored top-1 and that id's probability): {teacher_ece:.3f}")


if __name__ == "__main__":
    main()
