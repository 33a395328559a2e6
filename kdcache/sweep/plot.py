"""report.png: the headline metric vs student size, one point per student, the teacher as a line."""
from __future__ import annotations

import math
from pathlib import Path

MARKERS = {"cached KD": "o", "online KD": "s", "hard labels": "x"}


def plot_report(rows: list[dict], teacher: dict | None, metric: str, label: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [(metric, label)] + ([("top1_agreement", "top-1 agreement with teacher")] if metric != "top1_agreement" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for mode, marker in MARKERS.items():
            # A diverged student (perplexity inf, KL nan) has no point; the report's table and flags show it.
            pts = [(r["num_parameters"], r[key], r["name"]) for r in rows
                   if r["mode"] == mode and r.get(key) is not None and math.isfinite(r[key]) and r.get("num_parameters")]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=50, label=f"student ({mode})")
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if teacher and teacher.get(key) is not None:
            ax.axhline(teacher[key], color="k", linestyle="--", linewidth=1, label="teacher")
        ax.set_xscale("log")
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("student parameters")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("kdcache sweep: students vs teacher on the held-out cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
