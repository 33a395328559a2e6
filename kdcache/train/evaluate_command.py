"""`kdcache evaluate`: the CLI face of kdcache.train.evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import click

LABELS = (("kl", "KL(teacher || model)", "{:.4f}"), ("top1_agreement", "top-1 agreement", "{:.2%}"),
          ("accuracy", "accuracy (labelled)", "{:.2%}"), ("perplexity", "perplexity (labelled)", "{:,.2f}"),
          ("teacher_accuracy", "teacher accuracy", "{:.2%}"), ("teacher_perplexity", "teacher perplexity", "{:,.2f}"))


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Example: kdcache evaluate --model students/l4 --cache heldout_cache --json")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A trained student (train-student --out, a folder or an s3:// prefix) or any save_pretrained "
                   "model of the cache's task.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(),
              help="A held-out cache from `kdcache dump-logits` (same teacher and tokenizer, other text); "
                   "a folder or an s3:// (gs://, hdfs://) URI.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", help="cpu, cuda, ... [default: cuda if available]")
@click.option("--max-rows", type=click.IntRange(min=1), help="Evaluate on the first N rows only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate_cmd(model_dir, cache_dir, batch_size, device, max_rows, as_json):
    """Compare a model with the teacher on a held-out cache: KL to the teacher (over its top-k; for
    sampled caches an unbiased estimate of the full KL), top-1 agreement, hard-label accuracy and
    perplexity, and the teacher's own accuracy."""
    from .evaluate import evaluate

    from ..cache.storage import is_remote
    local = Path(model_dir)
    if is_remote(model_dir):
        from .bucket_out import fetch_student
        local = fetch_student(model_dir)
    metrics = evaluate(local, cache_dir, batch_size=batch_size, device=device, max_rows=max_rows,
                       progress=not as_json)
    metrics["model"] = str(model_dir)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(f"{metrics['model']} on {metrics['cache']} ({metrics['task']}, {metrics['rows']:,} rows, "
               f"{metrics['positions']:,} target positions, {metrics['labelled_positions']:,} labelled, "
               f"{metrics.get('targets', 'top-k')} targets, k={metrics['k']})")
    if metrics.get("select_positions") is not None:  # a selected cache: say what each figure is over
        click.echo(f"  soft targets at {metrics['soft_positions']:,} of {metrics['positions']:,} positions "
                   f"(--select-positions {metrics['select_positions']}): KL and top-1 agreement over those only; "
                   "accuracy and perplexity over every labelled position; no teacher figures")
    scope = metrics.get("token_scope")  # "assistant-token" on chat caches: say what was scored
    width = 50 if scope else 34
    for key, title, pattern in LABELS:
        value = metrics.get(key)
        if scope and key in ("kl", "top1_agreement", "perplexity", "teacher_perplexity"):
            title = f"{scope} {title}"
        click.echo(f"  {title:<{width}} {'—' if value is None else pattern.format(value)}")
