"""Summary numbers of a cache for `kdcache inspect`: sizes, top-k probability mass, teacher accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import schema as S
from .manifest import read_manifest, resolve_inside
from .shards import READ_ERRORS, corrupt_shard_error, open_shard


def _row_groups(cache_dir: Path, entry: dict, path: Path):
    """(index, table) of each row group of a shard; a damaged one is a one-line error."""
    try:
        pf = open_shard(path)
        for g in range(pf.num_row_groups):
            yield g, pf.read_row_group(g, columns=[S.TOPK_IDS, S.TOPK_LOGPROBS, S.LABELS])
    except READ_ERRORS as e:
        raise corrupt_shard_error(cache_dir, entry, e) from None


def cache_stats(cache_dir: Path) -> dict:
    """Streams the shards one row group at a time, so memory stays bounded for big caches."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    k = manifest["k"]
    mass_sum, positions, labelled, correct = 0.0, 0, 0, 0
    entries = manifest.get("shards", [])
    paths = [resolve_inside(cache_dir, entry.get("file"), f"shards[{i}].file") for i, entry in enumerate(entries)]
    for entry, path in zip(entries, paths):
        for g, t in _row_groups(cache_dir, entry, path):
            lp = t.column(S.TOPK_LOGPROBS).combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
            lp = lp.astype(np.float64).reshape(-1, k)
            ids = t.column(S.TOPK_IDS).combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
            labels = t.column(S.LABELS).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            mass_sum += float(np.exp(lp).sum())
            positions += len(lp)
            known = labels >= 0
            labelled += int(known.sum())
            correct += int((ids[known, 0] == labels[known]).sum())
    totals = manifest.get("totals", {})
    bytes_ = totals.get("bytes", 0)
    teacher = manifest.get("teacher", {})
    return {
        "cache": str(cache_dir),
        "task": manifest["task"],
        "teacher": teacher.get("source"),
        "teacher_architecture": teacher.get("architecture"),
        "complete": manifest.get("complete", False),
        "shards": f"{len(manifest.get('shards', []))}/{manifest.get('num_shards')}",
        "rows": totals.get("rows", 0),
        "positions": positions,
        "k": k,
        "target_vocab_size": manifest.get("target_vocab_size"),
        "dtype": manifest.get("dtype"),
        "max_length": manifest.get("max_length"),
        "bytes": bytes_,
        "bytes_per_position": round(bytes_ / positions, 2) if positions else None,
        "mean_topk_mass": round(mass_sum / positions, 6) if positions else None,
        "labelled_positions": labelled,
        "teacher_top1_accuracy": round(correct / labelled, 6) if labelled else None,
    }
