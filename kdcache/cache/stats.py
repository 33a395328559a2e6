"""Summary numbers of a cache for `kdcache inspect`: sizes, ids and probability mass per position, teacher accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import schema as S
from .kinds import kind_of
from .manifest import read_manifest_view, resolve_inside
from .shards import READ_ERRORS, corrupt_shard_error, open_shard
from .storage import location


def _row_groups(cache_dir: Path, entry: dict, path: Path, columns: list[str]):
    """(index, table) of each row group of a shard; a damaged one is a one-line error."""
    try:
        pf = open_shard(path)
        for g in range(pf.num_row_groups):
            yield g, pf.read_row_group(g, columns=columns)
    except READ_ERRORS as e:
        raise corrupt_shard_error(cache_dir, entry, e) from None


def _values(table, name: str, depth: int) -> np.ndarray:
    arr = table.column(name).combine_chunks()
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def cache_stats(cache_dir: Path) -> dict:
    """Streams the shards one row group at a time, so memory stays bounded for big caches.

    Per position: stored ids (top-k head + distinct drawn ids), teacher probability mass of the top-k
    head (`mean_topk_mass`) and outside it (`mean_tail_mass`), and mass of all stored ids together
    (`mean_stored_mass`; None for a cache without the draws' log-probs). The teacher's top-1 is its first
    stored id (for `sample` caches, the most probable id drawn).

    A selected cache (format v3): those per-position figures and the teacher's accuracy are over the
    selected positions (the ones with soft targets); bytes are given per selected position and per
    corpus token (file bytes / every target position), side by side."""
    cache_dir = location(cache_dir)  # a local folder or a bucket prefix
    manifest = read_manifest_view(cache_dir)
    kind, k = kind_of(manifest.target_kind), manifest.k
    selected = manifest.select_positions is not None
    columns = ([S.SOFT_MASK] if selected else []) + list(kind.stored_columns(manifest.draw_logprobs)) + [S.LABELS]
    totals = {"head_mass": 0.0, "stored_mass": 0.0, "entries": 0}  # the kind adds its row groups' numbers
    positions, soft_positions, labelled, correct = 0, 0, 0, 0
    shards = manifest.shards
    paths = [resolve_inside(cache_dir, entry.get("file"), f"shards[{i}].file") for i, entry in enumerate(shards)]
    for entry, path in zip(shards, paths):
        for _, t in _row_groups(cache_dir, entry, path, columns):
            labels = _values(t, S.LABELS, 1)
            positions += len(labels)
            if selected:  # the kind's columns cover the selected positions only: so do its figures
                labels = labels[_values(t, S.SOFT_MASK, 1).astype(bool)]
            n = len(labels)
            top1 = kind.stats(t, k, totals)
            if top1 is None:  # the teacher's top-1 is not stored: it never counts as correct
                top1 = np.full(n, -1, np.int64)
            soft_positions += n
            known = labels >= 0
            labelled += int(known.sum())
            correct += int((top1[known] == labels[known]).sum())
    head_mass, stored_mass, entries = totals["head_mass"], totals["stored_mass"], totals["entries"]
    totals = manifest.raw.get("totals", {})
    bytes_ = totals.get("bytes", 0)
    teacher = manifest.teacher
    mean = (lambda x: round(x / soft_positions, 6) if soft_positions else None)  # noqa: E731
    return {
        "cache": str(cache_dir),
        "format_version": manifest.raw.get("format_version"),
        "task": manifest.task,
        "teacher": teacher.get("source"),
        "teacher_architecture": teacher.get("architecture"),
        "complete": manifest.complete,
        "shards": f"{len(manifest.shards)}/{manifest.num_shards}",
        "rows": totals.get("rows", 0),
        "positions": positions,
        "targets": kind.name,
        "k": k,
        "samples": manifest.samples or None,
        "draw_logprobs": manifest.draw_logprobs if kind.draws else None,  # false: counts only (v3)
        "target_vocab_size": manifest.target_vocab_size,
        "dtype": manifest.raw.get("dtype"),
        "max_length": manifest.max_length,
        "bytes": bytes_,
        "bytes_per_position": round(bytes_ / positions, 2) if positions else None,
        **({"select_positions": manifest.select_positions, "selected_positions": soft_positions,
            "bytes_per_selected_position": round(bytes_ / soft_positions, 2) if soft_positions else None,
            "bytes_per_corpus_token": round(bytes_ / positions, 2) if positions else None} if selected else {}),
        "mean_ids_per_position": round(entries / soft_positions, 3) if soft_positions else None,
        "mean_topk_mass": mean(head_mass) if kind.head else None,
        "mean_tail_mass": round(1 - head_mass / soft_positions, 6) if soft_positions and kind.head else None,
        "mean_stored_mass": mean(stored_mass) if stored_mass == stored_mass else None,  # nan: drawn mass not stored
        "labelled_positions": labelled,
        "teacher_top1_accuracy": round(correct / labelled, 6) if labelled else None,
        **chat_stats(manifest.raw, positions, bytes_),
    }


def chat_stats(manifest: dict, positions: int, bytes_: int) -> dict:
    """Chat caches (manifest "chat"): conversations, turns, assistant targets and bytes per conversation."""
    chat, counts = manifest.get("chat"), manifest.get("chat_summary") or {}
    if not chat:
        return {}
    rows = (manifest.get("totals") or {}).get("rows", 0)
    return {
        "chat_layout": chat.get("layout"),
        "targets_on": chat.get("targets_on"),
        "end_of_turn": counts.get("end_of_turn") or None,
        "conversations": rows,
        "turns": counts.get("turns"),
        "assistant_turns": counts.get("assistant_turns"),
        "assistant_tokens": positions,  # the cached targets: assistant content + end-of-turn tokens
        "conversation_tokens": counts.get("tokens"),  # every token the teacher reads (all shards)
        "bytes_per_conversation": round(bytes_ / rows, 1) if rows else None,
        "truncated_conversations": (counts.get("truncated_at_turn", 0) + counts.get("truncated_mid_turn", 0)) if counts else None,
        "skipped_conversations": (counts.get("skipped_rows", 0) + counts.get("misaligned", 0)) if counts else None,
    }
