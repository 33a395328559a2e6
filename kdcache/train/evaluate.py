"""Comparing a student (or any model of the cache's task and vocabulary) with the teacher,
on a held-out cache: agreement with the stored soft targets, and hard-label quality.

Metrics (one dict; the keys of `kdcache evaluate --json`):
  kl              mean KL(teacher || model) over the stored top-k ids, both renormalised over them (T = 1)
  top1_agreement  fraction of targets where the model's argmax is the teacher's top-1
  accuracy        model accuracy on the targets with a known label (None if none)
  perplexity      exp(mean CE at labelled targets), LM tasks only
  teacher_accuracy, teacher_perplexity   the same for the teacher, from the cache alone
                  (perplexity only if every label is among the stored top-k)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.collate import move_batch
from ..cache.stream import CacheStream, open_cache
from ..errors import KdcacheError
from .forward import target_hidden
from .losses import DEFAULT_CHUNK_ELEMENTS
from .students import auto_class, load_pretrained


def load_model(model_dir: Path, cache, device):
    task = cache.task
    try:
        model = load_pretrained(auto_class(task), model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load a {task} model from {model_dir} ({str(e).splitlines()[0]}); "
                           "pass a directory written by `kdcache train-student` or save_pretrained") from None
    manifest = cache.manifest
    outputs = model.config.num_labels if task == "seq-cls" else model.config.vocab_size
    want = manifest.get("target_vocab_size") or manifest["vocab_size"]
    if outputs != want or model.config.vocab_size != manifest["vocab_size"]:
        raise KdcacheError(f"model {model_dir} has {outputs} outputs / {model.config.vocab_size} input tokens, the "
                           f"cache {cache.dir} {want} / {manifest['vocab_size']}; evaluate on a cache made with the "
                           "same tokenizer and task")
    return model.to(device).eval()


@torch.no_grad()
def evaluate(model_dir: str | Path, cache_dir: str | Path, *, batch_size: int = 32, device: str | None = None,
             max_rows: int | None = None, progress: bool = False) -> dict:
    """Metrics of the model in `model_dir` against the teacher's soft targets in `cache_dir`."""
    cache = open_cache(cache_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(Path(model_dir), cache, dev)
    task = cache.task
    stream = CacheStream(cache, batch_size=batch_size, shuffle=False)
    s = dict.fromkeys(("rows", "targets", "labelled", "kl", "agree", "correct", "ce", "t_correct", "t_ce",
                       "t_covered"), 0.0)
    from tqdm.auto import tqdm
    total = min(cache.num_rows, max_rows or cache.num_rows)
    bar = tqdm(total=total, desc="evaluate", unit="row", disable=not progress)
    for batch in stream:
        if max_rows is not None and s["rows"] >= max_rows:
            break
        batch = move_batch(batch, dev)
        hidden, head = target_hidden(model, task, batch)
        vocab = model.config.num_labels if task == "seq-cls" else model.config.vocab_size
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            _accumulate(s, head(hidden[part]).float(), batch["topk_ids"][part], batch["topk_logprobs"][part],
                        batch["labels"][part])
        s["rows"] += batch["num_rows"]
        bar.update(batch["num_rows"])
    bar.close()
    n, labelled = s["targets"], s["labelled"]
    lm = task in ("mlm", "clm")
    return {
        "task": task, "model": str(model_dir), "cache": str(cache_dir), "k": cache.k,
        "rows": int(s["rows"]), "positions": int(n), "labelled_positions": int(labelled),
        "kl": s["kl"] / n if n else None,
        "top1_agreement": s["agree"] / n if n else None,
        "accuracy": s["correct"] / labelled if labelled else None,
        "perplexity": _perplexity(s["ce"] / labelled) if lm and labelled else None,
        "teacher_accuracy": s["t_correct"] / labelled if labelled else None,
        "teacher_perplexity": (_perplexity(s["t_ce"] / labelled)
                               if lm and labelled and s["t_covered"] == labelled else None),
    }


def _perplexity(mean_ce: float) -> float:
    """exp(mean CE); inf for a diverged model (math.exp raises OverflowError past ~709)."""
    return math.exp(mean_ce) if mean_ce < 709 else math.inf


def _accumulate(s: dict, logits, topk_ids, topk_logprobs, labels) -> None:
    # Both distributions renormalised over the stored k ids: 0 for the teacher itself, and
    # comparable across models whatever mass the top-k covers.
    topk_ids = topk_ids.long()  # batches carry int32 ids
    log_p = topk_logprobs.float().log_softmax(-1)
    log_q = logits.gather(1, topk_ids).log_softmax(-1)
    s["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
    s["agree"] += float((logits.argmax(-1) == topk_ids[:, 0]).sum())
    s["targets"] += labels.shape[0]
    known = labels >= 0
    if known.any():
        y = labels[known]
        s["labelled"] += float(known.sum())
        s["correct"] += float((logits[known].argmax(-1) == y).sum())
        s["ce"] += float(F.cross_entropy(logits[known], y, reduction="sum"))
        s["t_correct"] += float((topk_ids[known][:, 0] == y).sum())
        hit = topk_ids[known] == y[:, None]
        covered = hit.any(-1)
        s["t_covered"] += float(covered.sum())
        s["t_ce"] += float(-(topk_logprobs[known].float() * hit).sum())
