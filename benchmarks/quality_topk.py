"""Does a larger k close the gap between cached and online KD? Pipeline 1's smallest student,
retrained from caches of the same teacher and corpus at several k, everything else equal.

Needs a finished pipeline-1 run (`make quickstart` or `python3 pipelines/causal_lm.py --small`):
its train corpus, held-out cache, the L2-H128 runs (cached top-64, online, hard) and their
training options. For each k it dumps a train cache (kept in --workdir, reused), trains the
same student with the same options, seed and data order, and evaluates it on the same
held-out cache. Perplexity is over the held-out labels, so it does not depend on k.

    python3 benchmarks/quality_topk.py [--pipeline runs/causal_lm-small] [--k 256,1024]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from train_common import REPO, command_line

# train-student options of the pipeline's run that this script passes on unchanged
PASSED = ("epochs", "batch_size", "lr", "weight_decay", "scheduler", "max_grad_norm", "temperature", "alpha",
          "tail", "seed", "num_workers", "shuffle_buffer")


def kdcache(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"kdcache {args[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def evaluate(model: Path, eval_cache: Path) -> dict:
    saved = model / "eval.json"
    if saved.is_file():  # written by `kdcache report` for the pipeline's own runs
        return json.loads(saved.read_text())["metrics"]
    return json.loads(kdcache("evaluate", "--model", model, "--cache", eval_cache, "--json"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=REPO / "runs" / "causal_lm-small")
    ap.add_argument("--student", default="L2-H128")
    ap.add_argument("--k", default="256,1024", help="comma-separated top-k values to dump and train")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kdcache_quality_topk"))
    args = ap.parse_args()
    runs, eval_cache = args.pipeline / "runs", args.pipeline / "eval-cache"
    base = json.loads((runs / args.student / "train_summary.json").read_text())
    manifest = json.loads((args.pipeline / "cache" / "manifest.json").read_text())
    options = base["args"]
    train = []
    for key in PASSED:
        train += [f"--{key.replace('_', '-')}", options[key]]
    dump = ["--teacher", manifest["teacher"]["source"], "--task", "clm", "--max-length", manifest["max_length"],
            "--data", manifest["data"]["source"], "--seed", manifest["seed"],
            "--batch-size", manifest["dump"]["batch_size"] or 8, "--no-progress"]

    rows = []
    for name, label in ((args.student, f"cached top-{manifest['k']} (the pipeline's run)"),
                        (f"{args.student}-online", "online full-vocabulary KD"),
                        (f"{args.student}-hard", "hard labels only")):
        if (runs / name).is_dir():
            rows.append((label, evaluate(runs / name, eval_cache), None))
    for k in (int(x) for x in args.k.split(",")):
        cache, student = args.workdir / f"cache-k{k}", args.workdir / f"{args.student}-k{k}"
        if not (cache / "manifest.json").is_file() or not json.loads((cache / "manifest.json").read_text())["complete"]:
            kdcache("dump-logits", *dump, "--out", cache, "--top-k", k)
        if not (student / "train_summary.json").is_file():
            kdcache("train-student", "--cache", cache, "--student", args.student, "--out", student, *train)
        stats = json.loads(kdcache("inspect", cache, "--json"))
        rows.append((f"cached top-{k}", evaluate(student, eval_cache), stats))

    online = next((m for label, m, _ in rows if label.startswith("online")), None)
    print(f"# {command_line()}")
    print(f"| {args.student} trained from | held-out perplexity | vs online KD | top-1 agreement | "
          "cache bytes / position | mean top-k mass |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m, stats in rows:
        gap = f"{(m['perplexity'] - online['perplexity']) / online['perplexity']:+.1%}" if online else "—"
        size = f"{stats['bytes_per_position']:,.0f}" if stats else "—"
        mass = f"{stats['mean_topk_mass']:.3f}" if stats else "—"
        print(f"| {label} | {m['perplexity']:,.1f} | {gap} | {m['top1_agreement']:.2%} | {size} | {mass} |")


if __name__ == "__main__":
    main()
