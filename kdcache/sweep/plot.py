"""report.png: the headline metric vs student size, one point per student, the teacher as a line.

Sweeps often span a narrow range of sizes (students pruned from one teacher: 36M .. 42M) and train
several students of one size (cached / online / hard labels), so the layout is done, not left to
matplotlib's defaults: tick labels are plain numbers (36.4M, 850) and any that would overprint
another are dropped; points that share a size are dodged sideways by a few pixels; each student's
name is placed where it overlaps no other name, with a leader line when it had to move away.
"""
from __future__ import annotations

import math
from pathlib import Path

MARKERS = {"cached KD": "o", "online KD": "s", "hard labels": "x"}
DPI = 110
DODGE_POINTS = 7.0   # sideways shift between students of the same size, in points
MAX_SIZE_TICKS = 8   # up to this many distinct sizes, tick exactly at each student's size


def short_params(n: float) -> str:
    """36_400_000 -> '36.4M': tick labels short enough for a narrow axis."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def plain_number(v: float, _pos=None) -> str:
    """Perplexities and other metrics on a log axis: 850, 1,300, 2.5 rather than 8.5×10^2."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.3g}"


def plot_report(rows: list[dict], teacher: dict | None, metric: str, label: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = build_figure(rows, teacher, metric, label)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def build_figure(rows: list[dict], teacher: dict | None, metric: str, label: str):
    """The report's figure, laid out (tick labels thinned, names placed) for saving at DPI."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [(metric, label)] + ([("top1_agreement", "top-1 agreement with teacher")] if metric != "top1_agreement" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False, dpi=DPI)
    placements = []
    for ax, (key, title) in zip(axes[0], panels):
        placements.append((ax, _draw_panel(ax, rows, teacher, key, title)))
    handles = {}
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    if handles:  # one legend under the panels, where it can cover no point or name
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("kdcache sweep: students vs teacher on the held-out cache")
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    # From here on the axes do not move, so pixel extents measured now are those of the saved file.
    renderer = fig.canvas.get_renderer()
    for ax, points in placements:
        for axis in (ax.xaxis, ax.yaxis):
            _thin_tick_labels(fig, ax, axis, renderer)
        _place_names(fig, ax, points, renderer)
    return fig


def _draw_panel(ax, rows, teacher, key, title) -> list[tuple]:
    """Scatter the students on one panel; returns (x, y, name, transform of its point) per point."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    # A diverged student (perplexity inf, KL nan) has no point; the report's table and flags show it.
    shown = [r for r in rows if r.get(key) is not None and math.isfinite(r[key]) and r.get("num_parameters")
             and r["mode"] in MARKERS]
    by_size: dict = {}
    for r in shown:
        by_size.setdefault(r["num_parameters"], []).append(r)
    dodge = {}
    for same in by_size.values():  # students of one size side by side, centred on the true size
        for i, r in enumerate(sorted(same, key=lambda r: (list(MARKERS).index(r["mode"]), r["name"]))):
            dodge[r["name"]] = (i - (len(same) - 1) / 2) * DODGE_POINTS
    points = []
    for mode, marker in MARKERS.items():
        pts = [r for r in shown if r["mode"] == mode]
        for n, shift in enumerate(sorted({dodge[r["name"]] for r in pts})):
            group = [r for r in pts if dodge[r["name"]] == shift]
            where = _dodged(ax, shift)
            ax.scatter([r["num_parameters"] for r in group], [r[key] for r in group], marker=marker, s=50,
                       color=f"C{list(MARKERS).index(mode)}", label=f"student ({mode})" if n == 0 else None,
                       transform=where, zorder=3)
            points += [(r["num_parameters"], r[key], r["name"], where) for r in group]
    if points:  # shifted scatters do not count towards the axes' limits by themselves
        ax.update_datalim([(x, y) for x, y, _, _ in points])
    if teacher and teacher.get(key) is not None and math.isfinite(teacher[key]):
        ax.axhline(teacher[key], color="k", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log")
    sizes = sorted(by_size)
    if len(sizes) == 1:  # a log axis around one value: a factor of two either side
        ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
    else:
        ax.margins(x=0.12)
    if 0 < len(sizes) <= MAX_SIZE_TICKS:
        ax.xaxis.set_major_locator(FixedLocator(sizes))
    else:
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: short_params(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if key == "perplexity":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain_number))  # thinned below like the rest
    ax.margins(y=0.08)
    ax.set_xlabel("student parameters")
    ax.set_ylabel(title)
    ax.grid(True, which="both", alpha=0.3)
    return points


def _dodged(ax, points: float):
    """Data coordinates shifted `points` to the right on screen: the true size stays on the axis."""
    from matplotlib.transforms import ScaledTranslation

    if not points:
        return ax.transData
    return ax.transData + ScaledTranslation(points / 72.0, 0, ax.figure.dpi_scale_trans)


def _thin_tick_labels(fig, ax, axis, renderer) -> None:
    """Keep only tick labels that overprint no other (major ticks first, then minor), as fixed ticks."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    fig.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    candidates = []
    for major, ticks in ((True, axis.get_major_ticks()), (False, axis.get_minor_ticks())):
        for tick in ticks:
            text = tick.label1
            pos = tick.get_loc()
            if text.get_visible() and text.get_text() and lo <= pos <= hi:
                candidates.append((not major, pos, text.get_text(), text.get_window_extent(renderer).padded(2)))
    kept = []
    for _, pos, text, box in sorted(candidates, key=lambda c: (c[0], c[1])):
        if all(not box.overlaps(other) for _, _, other in kept):
            kept.append((pos, text, box))
    kept.sort()
    limits = axis.get_view_interval()
    axis.set_major_locator(FixedLocator([p for p, _, _ in kept]))
    axis.set_major_formatter(FixedFormatter([t for _, t, _ in kept]))
    axis.set_minor_formatter(NullFormatter())
    axis.set_view_interval(*limits, ignore=True)  # fixed ticks must not move the limits


def _place_names(fig, ax, points, renderer) -> None:
    """Each student's name next to its point, where it overlaps no other name or point and stays inside
    the axes; a name that had to move up or down gets a thin leader line back to its point."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    frame = ax.get_window_extent(renderer)
    radius = 5.0 * fig.dpi / 72.0  # a marker of s=50 is about 7 points across

    def marker_box(x, y, where):
        px, py = where.transform((x, y))
        return Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)

    markers = [marker_box(x, y, where) for x, y, _, where in points]
    step = 10  # points between stacked candidate positions
    candidates = [(0, 8), (0, -8)] + [(dy, dx) for k in range(1, 7) for dy in (k * step, -k * step) for dx in (8, -8)]
    placed = []
    # Left to right, then top to bottom, so a column of same-size students stacks in order.
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    for i in order:
        x, y, name, where = points[i]
        best = None
        for dy, dx in candidates:
            ann = _name(ax, name, (x, y), where, dx, dy, leader=False)
            box = ann.get_window_extent(renderer).padded(1)
            ann.remove()
            clash = sum(_overlap(box, other) for other in placed)
            clash += sum(_overlap(box, m) for j, m in enumerate(markers) if j != i)
            outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            score = (outside, clash)
            if best is None or score < best[0]:
                best = (score, dx, dy, box)
            if score == (False, 0):
                break
        _, dx, dy, box = best
        _name(ax, name, (x, y), where, dx, dy, leader=dy != 0)
        placed.append(box)


def _name(ax, name, xy, where, dx, dy, *, leader: bool):
    arrow = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4,
             "relpos": (0.0 if dx > 0 else 1.0, 0.5)} if leader else None
    return ax.annotate(name, xy, xycoords=where, textcoords="offset points", xytext=(dx, dy), fontsize=8,
                       ha="left" if dx > 0 else "right", va="center", zorder=4, arrowprops=arrow)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)
