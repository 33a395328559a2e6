"""Side by side: a benchmark run against an earlier revision of kdcache and against the work
tree, alternating in one session so both see the same (shared, noisy) machine.

The earlier revision is checked out as a git worktree; each round runs the benchmark script of
the *current* tree with PYTHONPATH pointing at one revision's package, and reads its --json.

    python benchmarks/compare_revisions.py REV [--rounds 3] -- train_loader.py --rows 4000 ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(tree: Path, script: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, str(HERE / script[0]), *script[1:], "--repeats", "1", "--json", str(out)],
                   env=env, cwd=HERE, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the earlier git revision (e.g. a commit id)")
    ap.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.error("give the benchmark after --, e.g. -- train_loader.py --rows 4000")
    split = argv.index("--")
    args, script = ap.parse_args(argv[:split]), argv[split + 1:]
    work = Path(tempfile.mkdtemp(prefix="kdcache_compare_"))
    old_tree = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.rev],
                   check=True, capture_output=True)
    try:
        commit = subprocess.run(["git", "-C", str(old_tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        rounds = {"old": [], "new": []}
        for i in range(args.rounds):  # alternate: old, new, old, new, ...
            rounds["old"].append(run(old_tree, script, work / f"old{i}.json"))
            rounds["new"].append(run(ROOT, script, work / f"new{i}.json"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    print(f"# python benchmarks/compare_revisions.py {args.rev} --rounds {args.rounds} -- {' '.join(script)}")
    print(f"# old = {commit}, new = work tree; medians of {args.rounds} alternating rounds")
    print("| case | metric | old | new | new / old |")
    print("|---|---|---:|---:|---:|")
    for case, metrics in rounds["new"][0].items():
        for metric in metrics:
            if not isinstance(metrics[metric], (int, float)):
                continue  # nested details (train_loader.py's crc_cost): not a rate to compare
            old = statistics.median(r[case][metric] for r in rounds["old"])
            new = statistics.median(r[case][metric] for r in rounds["new"])
            fmt = (lambda v: f"{v:,.0f}") if max(abs(old), abs(new)) >= 100 else (lambda v: f"{v:.2f}")
            print(f"| {case} | {metric} | {fmt(old)} | {fmt(new)} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
