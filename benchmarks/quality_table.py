"""Cached top-k KD vs online full-vocabulary KD vs hard labels, from a pipeline's evaluated runs.

    python3 benchmarks/quality_table.py runs/causal_lm-small/runs runs/classification-small/runs

Reads what `kdcache report` stored (RUNS/<name>/eval.json, train_summary.json): for each run folder
`X-online` it finds the cached-KD twin `X` and the hard-label twin `X-hard` (the pipelines' naming),
and prints held-out perplexity (LM) or accuracy (classification) with the relative gap to online KD.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> dict | None:
    try:
        metrics = json.loads((run / "eval.json").read_text())["metrics"]
        summary = json.loads((run / "train_summary.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return {**metrics, "steps": summary["steps"], "seconds": summary["seconds"]}


def main(paths: list[str]) -> None:
    print("| runs | student | metric | cached top-k KD | online full KD | cached vs online | hard labels only | steps | train s cached / online |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for runs in map(Path, paths):
        for online_dir in sorted(runs.glob("*-online")):
            base = online_dir.name[: -len("-online")]
            online, cached, hard = load(online_dir), load(runs / base), load(runs / f"{base}-hard")
            if not (online and cached):
                continue
            lm = online.get("perplexity") is not None
            key, fmt = ("perplexity", "{:.2f}") if lm else ("accuracy", "{:.2%}")
            gap = (cached[key] - online[key]) / online[key]
            print(f"| {runs} | {base} | held-out {key} | {fmt.format(cached[key])} | {fmt.format(online[key])} | "
                  f"{gap:+.2%} | {fmt.format(hard[key]) if hard else '—'} | {cached['steps']} | "
                  f"{cached['seconds']:.0f} / {online['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/causal_lm-small/runs", "runs/classification-small/runs"])
