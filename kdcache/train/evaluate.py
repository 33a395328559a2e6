"""Comparing a student (or any model of the cache's task and vocabulary) with the teacher,
on a held-out cache: agreement with the stored soft targets, and hard-label quality.

Metrics (one dict; the keys of `kdcache evaluate --json`):
  kl              top-k caches: mean KL(teacher || model) over the stored top-k ids, both renormalised
                  over them (T = 1). Sampled caches ("sample", "top-k+sample"): an unbiased estimate of
                  the full-vocabulary KL(teacher || model), Σ_j w_j (log p_j - log q_j) with the cache's
                  per-id weights (losses.sparse_target_weights at T = 1) and the model's full softmax q.
  top1_agreement  fraction of targets where the model's argmax is the teacher's top-1. For the
                  "sample" kind the teacher's argmax is not stored; the drawn id with the highest
                  teacher log-prob stands in for it (the same id whenever the argmax was drawn).
  accuracy        model accuracy on the targets with a known label (None if none)
  perplexity      exp(mean CE at labelled targets), LM tasks only
  ece, teacher_ece  expected calibration error (15 bins) of the model's next-token confidence at labelled
                  targets (calibration.py); the teacher's from the cache's most probable stored id
  teacher_accuracy, teacher_perplexity   the same for the teacher, from the cache alone
                  (perplexity only if every label is among the stored ids; accuracy uses the same
                  stand-in top-1 as top1_agreement)
  A cache dumped with --no-draw-logprobs (counts only) has no teacher log-prob at its drawn ids: there
  kl is None, and the teacher's figures use only the exact top-k head (`sample`: teacher_ece and
  teacher_perplexity None; top-k+sample: teacher_perplexity None unless every label is in the head).
  select_positions, soft_positions   a selected cache (format v3, `dump-logits --select-positions`): its
                  fraction and the positions with soft targets (None / every position otherwise). There kl,
                  top1_agreement are over the selected positions only; accuracy, perplexity and ece over
                  every labelled position; the teacher's figures are None (its soft targets are only at
                  the selected, highest-entropy positions: no figure over them would be comparable).
  token_scope     "assistant-token" for a chat cache whose targets are the assistant's tokens
                  (manifest "chat"), else None. Every metric above is over the cached positions only,
                  and the model sees each row whole, so on a chat cache they are assistant-token
                  metrics with the whole conversation as context.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.collate import move_batch
from ..cache.stream import CacheStream, open_cache
from ..errors import KdcacheError
from .calibration import CalibrationBins
from .forward import target_hidden
from .losses import DEFAULT_CHUNK_ELEMENTS, sparse_target_weights
from ..models import auto_class
from .students import load_pretrained


def load_model(model_dir: Path, cache, device):
    task = cache.task
    try:
        model = load_pretrained(auto_class(task), model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load a {task} model from {model_dir} ({str(e).splitlines()[0]}); "
                           "pass a directory written by `kdcache train-student` or save_pretrained") from None
    manifest = cache.view
    outputs = model.config.num_labels if task == "seq-cls" else model.config.vocab_size
    want = manifest.target_vocab_size
    if outputs != want or model.config.vocab_size != manifest.vocab_size:
        raise KdcacheError(f"model {model_dir} has {outputs} outputs / {model.config.vocab_size} input tokens, the "
                           f"cache {cache.dir} {want} / {manifest.vocab_size}; evaluate on a cache made with the "
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
    exact_logprobs = cache.view.draw_logprobs  # False: only the head's stored log-probs are the teacher's
    s = dict.fromkeys(("rows", "targets", "soft", "labelled", "kl", "agree", "correct", "ce", "t_correct", "t_ce",
                       "t_covered"), 0.0)
    s["calibration"], s["t_calibration"] = CalibrationBins(), CalibrationBins()
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
            counts, soft_mask = batch.get("target_counts"), batch.get("soft_mask")
            _accumulate(s, head(hidden[part]).float(), batch["target_ids"][part], batch["target_logprobs"][part],
                        batch["labels"][part], None if counts is None else counts[part], batch.get("target_head", 0),
                        None if soft_mask is None else soft_mask[part],
                        exact=None if exact_logprobs else batch.get("target_head", 0))
        s["rows"] += batch["num_rows"]
        bar.update(batch["num_rows"])
    bar.close()
    n, labelled, soft = s["targets"], s["labelled"], s["soft"]
    lm = task in ("mlm", "clm")
    selected = cache.view.select_positions is not None
    teacher = not selected  # the teacher's figures need its soft targets at every labelled position
    return {
        "task": task, "model": str(model_dir), "cache": str(cache_dir), "k": cache.k,
        "targets": cache.view.target_kind, "token_scope": token_scope(cache.view.raw),
        "rows": int(s["rows"]), "positions": int(n), "labelled_positions": int(labelled),
        "select_positions": cache.view.select_positions, "soft_positions": int(soft),
        "kl": s["kl"] / soft if soft and exact_logprobs else None,
        "top1_agreement": s["agree"] / soft if soft else None,
        "accuracy": s["correct"] / labelled if labelled else None,
        "perplexity": _perplexity(s["ce"] / labelled) if lm and labelled else None,
        "ece": s["calibration"].ece(), "teacher_ece": s["t_calibration"].ece() if teacher else None,
        "teacher_accuracy": s["t_correct"] / labelled if labelled and teacher else None,
        "teacher_perplexity": (_perplexity(s["t_ce"] / labelled)
                               if lm and labelled and teacher and s["t_covered"] == labelled else None),
    }


def token_scope(manifest: dict) -> str | None:
    """What the cached positions are, when not every token: "assistant-token" for chat caches that
    target the assistant's replies (all of them, or the last one)."""
    chat = manifest.get("chat")
    if isinstance(chat, dict) and chat.get("targets_on", "assistant") in ("assistant", "last-assistant"):
        return "assistant-token"
    return None


def _perplexity(mean_ce: float) -> float:
    """exp(mean CE); inf for a diverged model (math.exp raises OverflowError past ~709)."""
    return math.exp(mean_ce) if mean_ce < 709 else math.inf


def _accumulate(s: dict, logits, target_ids, target_logprobs, labels, counts=None, head: int = 0,
                soft_mask=None, exact: int | None = None) -> None:
    """soft_mask (a selected cache): the targets with soft targets; KL and agreement are over those only,
    the teacher's figures are not kept (see the module docstring).
    exact: how many leading columns hold the teacher's own log-probs (None: all); the others hold
    decode's stand-in (a --no-draw-logprobs cache), which no teacher figure may use."""
    target_ids = target_ids.long()  # batches carry int32 ids
    _soft_metrics(s, *((logits, target_ids, target_logprobs, counts) if soft_mask is None else
                       (logits[soft_mask], target_ids[soft_mask], target_logprobs[soft_mask],
                        None if counts is None else counts[soft_mask])), head)
    s["targets"] += labels.shape[0]
    known = labels >= 0
    _model_metrics(s, logits, labels, known)
    if soft_mask is None and known.any():  # the teacher's own figures, from its stored soft targets
        y = labels[known]
        s["t_correct"] += float((target_ids[known][:, 0] == y).sum())
        if exact is None or exact > 0:
            s["t_calibration"].add(target_logprobs[known][:, 0].float().exp(), target_ids[known][:, 0] == y)
        hit = (target_ids[known] == y[:, None]) & (target_logprobs[known] > float("-inf"))  # padding is -inf
        if exact is not None:
            hit[:, exact:] = False  # a label hit among stand-in log-probs: not covered
        covered = hit.any(-1)
        s["t_covered"] += float(covered.sum())
        s["t_ce"] += float(-torch.where(hit, target_logprobs[known].float(), 0.0).sum())


def _soft_metrics(s: dict, logits, target_ids, target_logprobs, counts, head: int) -> None:
    """KL and top-1 agreement against the stored soft targets, at targets that have them."""
    # The teacher's weights and log-probs at the stored ids, as training sees them at T = 1.
    w, log_p = sparse_target_weights(target_logprobs.float(), counts, head, 1.0)
    log_q = logits.gather(1, target_ids)
    if counts is None:
        # Top-k: the model renormalised over the same k ids, so the teacher itself scores 0 and the
        # figure is comparable across models whatever mass the top-k covers.
        log_q = log_q.log_softmax(-1)
    else:
        # Sampled targets: the weighted draws estimate E_teacher[log p - log q] over the whole vocabulary.
        log_q = log_q - logits.logsumexp(-1, keepdim=True)
    s["kl"] += float((w * (log_p - log_q)).sum())
    s["agree"] += float((logits.argmax(-1) == target_ids[:, 0]).sum())
    s["soft"] += logits.shape[0]


def _model_metrics(s: dict, logits, labels, known) -> None:
    """The model's accuracy, CE and calibration at the labelled targets (a selected cache: all of them)."""
    if known.any():
        y = labels[known]
        s["labelled"] += float(known.sum())
        s["correct"] += float((logits[known].argmax(-1) == y).sum())
        s["ce"] += float(F.cross_entropy(logits[known], y, reduction="sum"))
        s["calibration"].add_logits(logits[known], y)
