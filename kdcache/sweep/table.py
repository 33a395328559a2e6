"""The report's table: one row per student plus the teacher, as Markdown."""
from __future__ import annotations

# (column title, metrics key, format). The keys are those of `kdcache evaluate --json`.
METRIC_COLUMNS = (
    ("KL to teacher", "kl", "{:.4f}"),
    ("top-1 agreement", "top1_agreement", "{:.2%}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("perplexity", "perplexity", "{:,.2f}"),
)


def fmt(value, pattern: str) -> str:
    if value is None:
        return "—"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


def fmt_params(n) -> str:
    if not n:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def metric_columns(rows) -> list[tuple[str, str, str]]:
    """Only the metrics that some row has (no perplexity column for classification)."""
    return [c for c in METRIC_COLUMNS if any(r.get(c[1]) is not None for r in rows)]


def markdown_table(rows: list[dict]) -> str:
    """rows: dicts with name, mode, num_parameters, tokens_per_second and the metric keys; optionally
    lr, options (a student's own sweep options) and flag (what the report warns about it)."""
    columns = metric_columns(rows)
    extra = [(title, key) for title, key in (("options", "options"), ("flag", "flag")) if any(r.get(key) for r in rows)]
    header = ["student", "mode", "parameters", "lr", "train tokens/s"] + [title for title, _, _ in columns]
    header += [title for title, _ in extra]
    aligns = ["---"] * 2 + ["---:"] * (len(header) - 2 - len(extra)) + ["---"] * len(extra)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for r in rows:
        cells = [r["name"], r["mode"], fmt_params(r.get("num_parameters")), fmt(r.get("lr"), "{:.3g}"),
                 fmt(r.get("tokens_per_second"), "{:,.0f}")]
        cells += [fmt(r.get(key), pattern) for _, key, pattern in columns]
        cells += [r.get(key) or "" for _, key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
