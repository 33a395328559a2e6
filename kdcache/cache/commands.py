"""`kdcache inspect` and `kdcache verify`: read-only views of a cache."""
from __future__ import annotations

import json

import click


@click.command("inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=click.Path())  # a folder or an s3:// (gs://, hdfs://) URI
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def inspect_cmd(cache, as_json):
    """Summarise CACHE: task, teacher, rows, positions, target kind, k, samples, size, bytes per
    position, stored ids per position, teacher mass of the top-k head, outside it (tail) and of all
    stored ids, and the teacher's top-1 accuracy where labels exist."""
    from .stats import cache_stats

    stats = cache_stats(cache)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    width = max(len(key) for key in stats)
    for key, value in stats.items():
        if key == "bytes":
            value = f"{value:,} ({value / 2**20:.2f} MiB)"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        click.echo(f"{key.replace('_', ' '):<{width}}  {value if value is not None else '-'}")


@click.command("verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=click.Path())  # a folder or an s3:// (gs://, hdfs://) URI
def verify_cmd(cache):
    """Check every shard of CACHE: checksum, row count, schema, ids < vocab, log-probs finite,
    <= 0 and sorted; sampled targets: draw counts sum to N per position, ids distinct per position;
    --select-positions caches: soft_mask selects ceil(fraction x targets) per row, one soft target each.
    Names the first bad shard and exits non-zero."""
    from tqdm.auto import tqdm

    from ..cache.manifest import read_manifest
    from .verify import verify_cache

    total = len(read_manifest(cache).get("shards", []))
    with tqdm(total=total, unit="shard", desc="verify", leave=False) as bar:
        report = verify_cache(cache, progress=lambda entry: bar.update(1))
    click.echo(f"ok: {report['shards']} shards, {report['rows']:,} rows, {report['positions']:,} positions verified in {cache}")
