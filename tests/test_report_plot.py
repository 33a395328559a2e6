"""report.png's layout: no tick label overprints another, no student's name overprints another name or
point, every student is named once, inside its panel. Rendered with Agg at the saved resolution."""
from __future__ import annotations

import itertools
import random

import pytest

from kdcache.sweep import plot


def quickstart_rows() -> list[dict]:
    """The shape of `make quickstart`'s sweep: students pruned from one teacher (a narrow size range),
    three of one size (cached / online / hard labels) with nearly equal perplexities."""
    return [
        {"name": "l2", "mode": "cached KD", "num_parameters": 36_400_000, "perplexity": 846.0, "top1_agreement": 0.1669},
        {"name": "l2-online", "mode": "online KD", "num_parameters": 36_400_000, "perplexity": 841.3, "top1_agreement": 0.1671},
        {"name": "l2-hard", "mode": "hard labels", "num_parameters": 36_400_000, "perplexity": 1329.3, "top1_agreement": 0.1534},
        {"name": "l3", "mode": "cached KD", "num_parameters": 36_900_000, "perplexity": 700.0, "top1_agreement": 0.18},
        {"name": "l4", "mode": "cached KD", "num_parameters": 42_100_000, "perplexity": 614.0, "top1_agreement": 0.1964},
    ]


def crowded_rows() -> list[dict]:
    """Ten sizes over two decades, up to three students each."""
    rng = random.Random(1)
    rows = []
    for i, n in enumerate([1.2e6, 2.5e6, 2.6e6, 5e6, 1e7, 1.1e7, 3e7, 6e7, 1.2e8, 2.4e8]):
        for mode in ("cached KD", "online KD", "hard labels")[: 1 + i % 3]:
            ppl = 3000 / (n / 1e6) ** 0.3 * (1.3 if mode == "hard labels" else 1.0) * rng.uniform(0.97, 1.03)
            rows.append({"name": f"s{i}-{mode.split()[0]}", "mode": mode, "num_parameters": int(n),
                         "perplexity": ppl, "top1_agreement": 0.1 + 0.02 * i})
    return rows


def shown_tick_labels(fig, axis) -> list:
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        text = tick.label1
        if text.get_visible() and text.get_text() and lo <= tick.get_loc() <= hi:
            out.append((text.get_text(), text.get_window_extent(renderer)))
    return out


def assert_apart(boxes, what):
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{what} {a!r} and {b!r} overprint each other"


@pytest.mark.parametrize("rows", [quickstart_rows(), crowded_rows()], ids=["narrow-range", "crowded"])
def test_tick_labels_and_names_do_not_overprint(rows):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig = plot.build_figure(rows, {"perplexity": 128.2, "top1_agreement": 1.0}, "perplexity", "held-out perplexity")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = shown_tick_labels(fig, axis)
                assert len(labels) >= 2, f"{axis.axis_name}-axis has {len(labels)} tick labels"
                assert_apart(labels, "tick labels")
            # The text's own box (an Annotation's extent would include its leader line).
            names = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]
            assert sorted(n for n, _ in names) == sorted(r["name"] for r in rows)  # each student named once
            assert_apart(names, "names")
            frame = ax.get_window_extent(renderer)
            for name, box in names:
                assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
    finally:
        plt.close(fig)


def test_narrow_range_ticks_are_the_students_sizes_in_plain_numbers():
    import matplotlib.pyplot as plt

    fig = plot.build_figure(quickstart_rows(), None, "perplexity", "held-out perplexity")
    try:
        fig.canvas.draw()
        texts = [t for t, _ in shown_tick_labels(fig, fig.axes[0].xaxis)]
        # 36.4M and 36.9M would overprint at this width: one of them is dropped, never both drawn.
        assert texts in (["36.4M", "42.1M"], ["36.9M", "42.1M"]), texts
        assert all("10^" not in t and "×" not in t for t, _ in shown_tick_labels(fig, fig.axes[0].yaxis))
    finally:
        plt.close(fig)


def test_students_of_one_size_are_dodged_apart_on_screen():
    import matplotlib.pyplot as plt

    fig = plot.build_figure(quickstart_rows(), None, "perplexity", "held-out perplexity")
    try:
        fig.canvas.draw()
        ax = fig.axes[1]  # top-1 agreement: the three 36.4M students within 0.014 of each other
        centres = [c.get_offset_transform().transform(c.get_offsets())[:, 0] for c in ax.collections]
        xs = sorted(x for column in centres for x in column)
        same_size = xs[:3]
        assert min(b - a for a, b in zip(same_size, same_size[1:])) >= plot.DODGE_POINTS * fig.dpi / 72 - 0.5
    finally:
        plt.close(fig)
