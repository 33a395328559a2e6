"""Before/after table of sweeps over the same cache: one learning rate for all vs the sweep's default.

Reads what `kdcache sweep` and `kdcache report` left in each sweep folder (train_summary.json,
eval.json and the flag column of report.md) and prints one Markdown table, a row per student and a column
group per sweep, plus whether each curve is monotone in size.

    python benchmarks/sweep_table.py --metric accuracy one-lr=runs/cls/before width-rule=runs/cls/after

(benchmarks/sweep.md has the exact sweep and report commands behind each table.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path) -> dict[str, dict]:
    runs = {}
    flags = {}
    report = folder / "report.md"
    if report.is_file():  # the flag column of the report's table
        lines = [line for line in report.read_text().splitlines() if line.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        for line in lines[2:]:
            row = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            flags[row["student"]] = [row["flag"]] if row.get("flag") else []
    for run in sorted(p for p in folder.iterdir() if (p / "eval.json").is_file()):
        summary = json.loads((run / "train_summary.json").read_text())
        metrics = json.loads((run / "eval.json").read_text())["metrics"]
        runs[run.name] = {"params": summary["num_parameters"], "lr": summary["args"]["lr"], **metrics,
                          "flags": flags.get(run.name, [])}
    return runs


def monotone(runs: dict[str, dict], metric: str) -> bool:
    points = sorted((r["params"], r[metric]) for r in runs.values())
    values = [v for _, v in points]
    better = (lambda a, b: a <= b) if metric == "perplexity" else (lambda a, b: a >= b)
    return all(better(b, a) for a, b in zip(values, values[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="LABEL=FOLDER, each a sweep folder with a report")
    parser.add_argument("--metric", choices=["accuracy", "perplexity"], default="accuracy")
    args = parser.parse_args()
    sweeps = [(label, load(Path(folder))) for label, folder in (s.split("=", 1) for s in args.sweeps)]
    names = sorted({n for _, runs in sweeps for n in runs}, key=lambda n: next(r[n]["params"] for _, r in sweeps if n in r))
    fmt = (lambda v: f"{v:,.2f}") if args.metric == "perplexity" else (lambda v: f"{v:.2%}")
    header = ["student", "parameters"] + [f"{label}: {h}" for label, _ in sweeps for h in ("lr", args.metric, "flag")]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|" + "---:|---:|---|" * len(sweeps))
    for name in names:
        params = next(r[name]["params"] for _, r in sweeps if name in r)
        cells = [name, f"{params / 1e6:.2f}M"]
        for _, runs in sweeps:
            r = runs.get(name)
            cells += [f"{r['lr']:.3g}", fmt(r[args.metric]), "; ".join(r["flags"]) or "—"] if r else ["—"] * 3
        print("| " + " | ".join(cells) + " |")
    for label, runs in sweeps:
        print(f"\n{label}: {args.metric} {'monotone' if monotone(runs, args.metric) else 'NOT monotone'} in size")


if __name__ == "__main__":
    main()
