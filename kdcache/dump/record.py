"""What the manifest says about a dump: its identity and settings, its complete shards, and the
time and tokens of every session that built it."""
from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..cache import schema as S
from ..cache.shards import complete_shards
from . import chat_spans


def special_token_ids(tokenizer) -> dict:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "cls", "sep", "mask")}


def build_manifest(opts, teacher, corpus, *, task, k, dtype, max_length, packing, num_shards,
                   targets: dict | None = None) -> dict:
    config = teacher.config
    id2label = None
    if task == "seq-cls":
        id2label = {str(i): str(v) for i, v in sorted((int(i), v) for i, v in (getattr(config, "id2label", None) or {}).items())}
    targets = targets or {"kind": S.TOP_K, "k": k, "samples": 0}
    return {
        "format_version": S.format_version_for(targets),
        "kdcache_version": __version__,
        "task": task,
        "k": k,
        "targets": targets,
        "vocab_size": teacher.vocab_size,
        "target_vocab_size": teacher.target_vocab_size,
        "num_labels": teacher.target_vocab_size if task == "seq-cls" else None,
        "id2label": id2label,
        "dtype": dtype,
        "max_length": max_length,
        "packing": packing,
        "mlm_probability": opts.mlm_probability if task == "mlm" else None,
        "mask_copies": opts.mask_copies if task == "mlm" else None,
        "seed": opts.seed,
        "shard_rows": opts.shard_rows,
        "token_type_ids": bool(corpus.has_pair),
        "special_token_ids": special_token_ids(teacher.tokenizer),
        "teacher": teacher.fingerprint,
        "tokenizer": {"sha256": teacher.tokenizer_sha256, "dir": S.TOKENIZER_DIR},
        "teacher_config": S.TEACHER_CONFIG,
        "data": corpus.description,
        "complete": False,
        "num_shards": num_shards,
        "shards": [],
        "totals": {"rows": 0, "positions": 0, "bytes": 0},
        "dump": {},
        # Chat corpora only: layout, --targets-on and the template's hash (identity), and the counts.
        **({"chat": chat_spans.manifest_record(corpus.chat), "chat_summary": corpus.chat.get("summary")}
           if getattr(corpus, "chat", None) else {}),
    }


def with_shards(manifest: dict, out: Path, known: dict | None = None, listing: bool = True) -> dict:
    """The manifest with the complete shards found in `out` (`known`: see complete_shards; updated).
    listing=False: only the `known` shards, without listing `out` (dump/bookkeeping.py)."""
    found = complete_shards(out, known) if listing else dict(known or {})
    if known is not None:
        known.update(found)
    shards = [stats for _, stats in sorted(found.items()) if stats["index"] < manifest["num_shards"]]
    manifest = dict(manifest, shards=shards)
    manifest["totals"] = {key: sum(s[key] for s in shards) for key in ("rows", "positions", "bytes")}
    manifest["complete"] = len(shards) == manifest["num_shards"]
    return manifest


def accumulate_runs(previous: dict, current: dict) -> dict:
    """The manifest's `dump` record covers every session that built this cache: a resumed dump adds its
    time and tokens to the earlier ones, and a re-run that had nothing left to do changes nothing.
    (Under torchrun these are rank 0's figures.)"""
    if not previous.get("real_tokens"):
        return current
    if not current["real_tokens"]:
        return previous
    merged = dict(current)
    for key in ("seconds", "real_tokens", "padded_tokens"):
        merged[key] = round(previous.get(key, 0) + current[key], 3)
    merged["tokens_per_second"] = round(merged["real_tokens"] / merged["seconds"], 1) if merged["seconds"] > 0 else None
    merged["padding_ratio"] = round(merged["padded_tokens"] / merged["real_tokens"], 4)
    merged["sessions"] = previous.get("sessions", 1) + 1
    return merged
