"""Test caches for stage two, written by hand from the cache contract (docs/FORMAT.md).

`teacher_cache` runs a tiny fixture teacher directly (fp32) and keeps its top-k log-probs, so
stage-two tests can compare against an independent teacher forward; `synthetic_cache` writes
random rows with small row groups for the stream tests.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.cache.files import atomic_write_json
from kdcache.cache.schema import FORMAT_VERSION, TOKENIZER_DIR, arrow_schema
from kdcache.cache.shards import write_shard

CLM, MLM, CLS = "clm", "mlm", "seq-cls"


def write_cache(cache_dir: Path, rows: list[dict], *, task: str, k: int, vocab_size: int, max_length: int,
                target_vocab_size: int | None = None, shard_rows: int = 64, row_group_rows: int = 16,
                special_token_ids: dict | None = None, teacher: dict | None = None, tokenizer=None,
                num_labels: int | None = None, id2label: dict | None = None, kind: str | None = None,
                samples: int = 0) -> Path:
    """Write `rows` (dicts with the contract's columns) as a complete cache; `kind` (with `samples`)
    writes a format-v2 manifest's `targets` for that target kind, else a top-k cache."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target_vocab_size = target_vocab_size or vocab_size
    with_tt = "token_type_ids" in rows[0]
    schema = arrow_schema(k=k, vocab_size=vocab_size, max_length=max_length,
                          target_vocab_size=target_vocab_size, with_token_type_ids=with_tt,
                          kind=kind or "top-k", samples=samples)
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_rows)):
        chunk = rows[start:start + shard_rows]
        table = pa.table({name: [r[name] for r in chunk] for name in schema.names}, schema=schema)
        shards.append(write_shard(cache_dir, index, table, row_group_rows=row_group_rows))
    if tokenizer is not None:
        tokenizer.save_pretrained(cache_dir / TOKENIZER_DIR)
    manifest = {
        "format_version": FORMAT_VERSION, "kdcache_version": "test", "task": task, "k": k,
        "vocab_size": vocab_size, "target_vocab_size": target_vocab_size, "num_labels": num_labels,
        "id2label": id2label, "dtype": "fp32", "max_length": max_length,
        "packing": False if task != CLS else None, "mlm_probability": 0.15 if task == MLM else None,
        "mask_copies": 1 if task == MLM else None, "seed": 0, "shard_rows": shard_rows,
        "token_type_ids": with_tt, "special_token_ids": special_token_ids or {"pad": 0},
        "teacher": teacher or {"source": "synthetic", "model_type": None},
        "tokenizer": {"sha256": "test", "dir": TOKENIZER_DIR},
        "data": {"source": "test"}, "complete": True, "num_shards": len(shards), "shards": shards,
        "totals": {"rows": len(rows), "positions": sum(s["positions"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards)},
        "dump": {},
    }
    if kind is not None:
        manifest["targets"] = {"kind": kind, "k": k, "samples": samples}
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return cache_dir


def synthetic_cache(cache_dir: Path, *, num_rows: int = 300, k: int = 4, vocab_size: int = 50,
                    shard_rows: int = 100, row_group_rows: int = 13, seed: int = 0) -> Path:
    """Random rows (ids 1000.. as example ids) with ragged lengths, for stream tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_rows):
        length = int(rng.integers(3, 12))
        positions = sorted(rng.choice(length, size=int(rng.integers(1, length)), replace=False).tolist())
        rows.append({
            "example_id": 1000 + i,
            "input_ids": rng.integers(1, vocab_size, length).tolist(),
            "positions": positions,
            "topk_ids": [rng.choice(vocab_size, k, replace=False).tolist() for _ in positions],
            "topk_logprobs": [np.sort(np.log(rng.dirichlet(np.ones(vocab_size))[:k]))[::-1].tolist() for _ in positions],
            "labels": rng.integers(-1, vocab_size, len(positions)).tolist(),
        })
    return write_cache(cache_dir, rows, task=MLM, k=k, vocab_size=vocab_size, max_length=16,
                       shard_rows=shard_rows, row_group_rows=row_group_rows)


def _special_ids(tok) -> dict:
    return {name: getattr(tok, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "cls", "sep", "mask")}


def teacher_rows(teacher_dir: Path, task: str, texts: list[str], *, k: int, labels: list[int] | None = None,
                 max_length: int = 32, seed: int = 0) -> tuple[list[dict], object, object]:
    """Cache rows from a direct fp32 forward of the teacher: (rows, tokenizer, model)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    auto = {MLM: AutoModelForMaskedLM, CLM: AutoModelForCausalLM, CLS: AutoModelForSequenceClassification}[task]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = auto.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    rows = []
    for i, text in enumerate(texts):
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 3:
            continue
        if task == MLM:
            special = set(tok.all_special_ids)
            candidates = [p for p, t in enumerate(ids) if t not in special]
            if not candidates:
                continue
            positions = sorted(rng.choice(candidates, max(1, round(0.3 * len(candidates))), replace=False).tolist())
            row_labels = [ids[p] for p in positions]
            ids = [tok.mask_token_id if p in positions else t for p, t in enumerate(ids)]
        elif task == CLM:
            positions = list(range(len(ids)))
            row_labels = ids[1:] + [-1]
        else:
            positions = [0]
            row_labels = [labels[i] if labels is not None else -1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        at = logprobs[positions] if task != CLS else logprobs[None]
        top = at.topk(k, dim=-1)
        rows.append({
            "example_id": i, "input_ids": ids, "positions": positions,
            "topk_ids": top.indices.tolist(),
            "topk_logprobs": top.values.to(torch.float16).tolist(),
            "labels": row_labels,
        })
    return rows, tok, model


def teacher_cache(cache_dir: Path, teacher_dir: Path, task: str, texts: list[str], *, k: int,
                  labels: list[int] | None = None, max_length: int = 32, shard_rows: int = 64,
                  row_group_rows: int = 16, seed: int = 0) -> Path:
    """A complete cache of `texts` under the fixture teacher at `teacher_dir`."""
    rows, tok, model = teacher_rows(teacher_dir, task, texts, k=k, labels=labels, max_length=max_length, seed=seed)
    config = model.config
    config_text = (Path(teacher_dir) / "config.json").read_text()
    teacher = {"source": str(Path(teacher_dir).resolve()), "gguf_file": None, "model_type": config.model_type,
               "architecture": config.architectures[0] if config.architectures else type(model).__name__,
               "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(), "weights_sha256": "test",
               "num_parameters": sum(p.numel() for p in model.parameters())}
    num_labels = config.num_labels if task == CLS else None
    id2label = {str(i): l for i, l in config.id2label.items()} if task == CLS else None
    return write_cache(cache_dir, rows, task=task, k=k, vocab_size=config.vocab_size, max_length=max_length,
                       target_vocab_size=num_labels if task == CLS else config.vocab_size,
                       shard_rows=shard_rows, row_group_rows=row_group_rows, special_token_ids=_special_ids(tok),
                       teacher=teacher, tokenizer=tok, num_labels=num_labels, id2label=id2label)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run `kdcache ARGS` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from kdcache.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def cli_ok(args: list[str]) -> str:
    code, out, err = run_cli(args)
    assert code == 0, f"kdcache {' '.join(map(str, args))} exited {code}:\n{err[-3000:]}"
    return out


def cli_error(args: list[str]) -> str:
    """Run a command that must fail the user-error way: exit 2, one `error:` line, no traceback."""
    code, _, err = run_cli(args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"exit {code}, stderr:\n{err[-3000:]}"
    return lines[0]


def sharp_bert_mlm(path: Path, tokenizer) -> Path:
    """A random tiny BERT MLM teacher whose predictions are confident (output LayerNorm scaled
    up), so there is something definite for a student to learn from it."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(40.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fp16_top1_ties(cache_dir: Path) -> tuple[int, int]:
    """(positions whose cached top-1 and top-2 log-probs are equal in fp16, all positions).

    Re-running the teacher batched differently moves its fp32 logits by ~1e-7, which can swap
    the top-1 only where the two are that close, and those are ties at fp16 precision."""
    import pyarrow.parquet as pq

    ties = positions = 0
    for row in pq.read_table(Path(cache_dir) / "data", columns=["topk_logprobs"]).to_pylist():
        lp = np.asarray(row["topk_logprobs"], dtype=np.float16)
        positions += len(lp)
        if lp.shape[1] > 1:
            ties += int((lp[:, 0] == lp[:, 1]).sum())
    return ties, positions
