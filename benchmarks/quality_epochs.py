"""Several epochs over one cache: which soft targets hold up, at how many bytes per corpus token?

Pipeline 1's teacher and student recipe (a finished `make quickstart` run) retrained from caches that hold
different targets, evaluated on the pipeline's held-out cache after 1, 3 and 10 epochs (--epochs). Each row is
ONE run per target spec, trained for the largest epoch count with a constant learning rate after warm-up
(`--scheduler constant_with_warmup`), stopped at each smaller epoch count (`--stop-after-steps`, exact resume)
and evaluated there: with a constant rate the model after epoch e of the long run is the model a run of e
epochs would end with (same rows, same order, same steps), so three epoch counts cost one run.

Online full-vocabulary KD pays the teacher's forward on every step of every epoch; a cache pays it once (the
dump's seconds). Both are printed. Bytes: per soft-target position (what the cache stores per position that
has soft targets) and per corpus token (the cache's files ÷ the tokens it covers, what a disk budget needs).

    python3 benchmarks/quality_epochs.py --train-chars 40000 --epochs 1,3,10 \\
        --targets top-k:8,top-k:64,sample:16,sample:32,sample:64,top-k+sample:8:16

Target specs as in quality_targets.py: `top-k:K`, `sample:N`, `top-k+sample:K:N`, `:counts` after a sampled
spec for --no-draw-logprobs, `@F` for --select-positions F (e.g. `top-k+sample:8:16:counts@0.1`). A counts-only
cache trains bit-identically to its twin with log-probs at T = 1 (same draws; tests/test_draw_logprobs.py), so
its row reuses the twin's run when that exists (say so in the table) and only its bytes are new. Caches, runs and
evaluations are kept in --workdir, so an interrupted table resumes and a second call with more specs only adds
rows; --table-only prints what is finished without training anything.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from quality_targets import Targets, complete, evaluate, kdcache
from train_common import REPO, command_line


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=REPO / "runs" / "causal_lm-small")
    ap.add_argument("--student", default="L2-H576", help="run name in PIPELINE/runs whose student and options are reused")
    ap.add_argument("--targets", default="top-k:8,top-k:64,sample:16,sample:32,sample:64,top-k+sample:8:16")
    ap.add_argument("--epochs", default="1,3,10", help="comma-separated epoch counts (one run, stopped at each)")
    ap.add_argument("--train-chars", type=int, default=None,
                    help="train on the first N characters of the pipeline's train text (cut at a line end) "
                         "[default: all of it]")
    ap.add_argument("--no-baselines", action="store_true", help="skip online KD and hard labels")
    ap.add_argument("--table-only", action="store_true", help="print the finished rows; train and dump nothing")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "quality_epochs")
    args = ap.parse_args()

    epochs = sorted(float(x) for x in args.epochs.split(","))
    runs, eval_cache = args.pipeline / "runs", args.pipeline / "eval-cache"
    base = json.loads((runs / args.student / "train_summary.json").read_text())
    options = base["args"]
    manifest = json.loads((args.pipeline / "cache" / "manifest.json").read_text())
    teacher = manifest["teacher"]["source"]
    args.workdir.mkdir(parents=True, exist_ok=True)

    data = Path(manifest["data"]["source"])
    if args.train_chars:
        text = data.read_text()
        cut = text.rfind("\n", 0, args.train_chars) + 1 or args.train_chars
        data = args.workdir / f"train-{args.train_chars}.txt"
        if not data.is_file() or data.read_text() != text[:cut]:
            data.write_text(text[:cut])
    dump = ["--teacher", teacher, "--task", manifest["task"], "--max-length", manifest["max_length"],
            "--data", data, "--seed", manifest["seed"], "--batch-size", manifest["dump"]["batch_size"] or 8,
            "--no-progress"]
    train = ["--student", options["student"], "--no-progress", "--batch-size", options["batch_size"],
             "--lr", options["lr"], "--weight-decay", options["weight_decay"], "--max-grad-norm",
             options["max_grad_norm"], "--temperature", options["temperature"], "--alpha", options["alpha"],
             "--seed", options["seed"], "--num-workers", options["num_workers"],
             "--shuffle-buffer", options["shuffle_buffer"], "--scheduler", "constant_with_warmup",
             "--epochs", epochs[-1], "--save-every", 0]
    if options.get("init_from_teacher"):
        train.append("--init-from-teacher")

    def cache_for(targets: Targets) -> Path | None:
        cache = args.workdir / f"cache-{targets.slug}"
        if not complete(cache):
            if args.table_only:
                return None
            print(f"[epochs] dumping {targets.label} to {cache}", file=sys.stderr, flush=True)
            kdcache("dump-logits", *dump, *targets.dump_args(), "--out", cache)
        return cache

    def run_epochs(name: str, cache: Path, *extra) -> list[tuple[float, Path]]:
        """(epochs, model dir) at each epoch count: one run, stopped and snapshotted at each."""
        rows = json.loads((cache / "manifest.json").read_text())["totals"]["rows"]
        per_epoch = math.ceil(rows / int(options["batch_size"]))
        run, out = args.workdir / "runs" / name, []
        for e in epochs:
            steps = math.ceil(e * per_epoch)
            snapshot = run if e == epochs[-1] else args.workdir / "runs" / f"{name}@{e:g}"
            if args.table_only and not (snapshot / "model.safetensors").is_file():
                break
            if not (snapshot / "model.safetensors").is_file():
                summary_file = run / "train_summary.json"
                done = json.loads(summary_file.read_text())["steps"] if summary_file.is_file() else 0
                if done < steps:
                    print(f"[epochs] training {name} to epoch {e:g} (step {steps})", file=sys.stderr, flush=True)
                    kdcache("train-student", "--cache", cache, "--out", run, *train, *extra,
                            "--stop-after-steps", steps - done,
                            *(["--resume"] if (run / "checkpoint").is_dir() else []))
                if snapshot != run:
                    # the checkpoint's weights with the model's config and tokenizer: a model directory
                    tmp = snapshot.with_name(snapshot.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(cache / "tokenizer", tmp)
                    shutil.copy(Path(options["student"]), tmp / "config.json")
                    shutil.copy(run / "checkpoint" / "model.safetensors", tmp / "model.safetensors")
                    shutil.copy(run / "train_summary.json", tmp / "train_summary.json")
                    tmp.rename(snapshot)
            out.append((e, snapshot))
        return out

    rows = []  # (label, epochs, model dir, cache or None)
    specs = [Targets.parse(s) for s in args.targets.split(",") if s]
    caches = {t: c for t in specs if (c := cache_for(t)) is not None}
    # online KD and hard labels read only the rows and labels of a cache without selection
    reference = next((c for t, c in caches.items() if t.select is None), None)
    if reference is None and not args.no_baselines:
        sys.exit("error: the baselines need a spec without @FRACTION (their rows and labels), or pass --no-baselines")
    if not args.no_baselines:
        rows += [("online full-vocabulary KD", e, d, None)
                 for e, d in run_epochs("online", reference, "--online-teacher", teacher)]
    for targets, cache in caches.items():
        twin = replace(targets, draw_logprobs=True)
        if not targets.draw_logprobs and twin in caches:  # trains bit-identically: reuse the twin's run
            rows += [(f"cached {targets.label} (= the run of its twin with log-probs)", e, d, cache)
                     for e, d in run_epochs(twin.slug, caches[twin])]
        else:
            rows += [(f"cached {targets.label}", e, d, cache) for e, d in run_epochs(targets.slug, cache)]
    if not args.no_baselines:
        rows += [("hard labels only", e, d, None) for e, d in run_epochs("hard", reference, "--alpha", 0)]

    print(f"# {command_line()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; student {options['student']}; "
          f"train {data} ({json.loads((next(iter(caches.values())) / 'manifest.json').read_text())['totals']['positions']:,} positions); "
          f"held-out {eval_cache}; constant lr {options['lr']} after warm-up, {epochs[-1]:g}-epoch runs")
    print("| trained from | epochs | B / soft-target position | B / corpus token | held-out perplexity | vs online KD "
          "| top-1 agreement | ECE | train s | teacher s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    online, stats = {}, {}
    for name, e, model, cache in sorted(rows, key=lambda r: (r[1], not r[0].startswith("online"))):
        m = evaluate(model, eval_cache)
        if name.startswith("online"):
            online[e] = m["perplexity"]
        seconds = json.loads((model / "train_summary.json").read_text())["seconds"]
        per_pos = per_token = teacher_s = "—"
        if cache is not None:
            if cache not in stats:
                stats[cache] = json.loads(kdcache("inspect", cache, "--json"))
            s, man = stats[cache], json.loads((cache / "manifest.json").read_text())
            soft = s.get("selected_positions") or man["totals"]["positions"]
            per_pos = f"{man['totals']['bytes'] / soft:,.1f}"
            per_token = f"{man['totals']['bytes'] / man['dump']['real_tokens']:,.1f}"
            teacher_s = f"{man['dump']['seconds']:.0f} once"
        elif name.startswith("online"):
            teacher_s = "every step"
        ref = online.get(e)
        gap = f"{(m['perplexity'] - ref) / ref:+.1%}" if ref and not name.startswith("online") else "—"
        print(f"| {name} | {e:g} | {per_pos} | {per_token} | {m['perplexity']:,.1f} | {gap} | "
              f"{m['top1_agreement']:.2%} | {m['ece']:.4f} | {seconds:.0f} | {teacher_s} |")


if __name__ == "__main__":
    main()
