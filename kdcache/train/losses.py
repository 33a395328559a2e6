"""Distillation losses on sparse targets.

KD term: forward KL(teacher || student) at temperature T, times T² (Hinton et al.), where the
teacher is its top-k distribution renormalised over the k stored ids (`tail="renorm"`), or the
top-k plus one "rest" bucket holding the mass outside them (`tail="bucket"`), and the student
is its full log-softmax read at the same ids (plus its own rest mass for the bucket).
Hard term: cross-entropy on the labels where known (-1 = unknown).
Total: alpha * KD + (1 - alpha) * hard.

Sampled targets (cache format v2, kinds "sample" and "top-k+sample"; see `sparse_target_weights`):
each stored id carries a weight such that Σ_j w_j f(id_j) is an unbiased estimate of E_teacher[f]
at T = 1, so the expected gradient equals full-vocabulary KD's. The reported KD term is then an
unbiased estimate of the full KL(teacher || student), not a KL over the stored ids.
T != 1: self-normalised importance weights, w ∝ count · p^(1/T - 1) (head ids: p^(1/T) exactly);
consistent, with a bias of order 1/N that vanishes at T = 1. `tail="bucket"` is for top-k targets only.
A cache dumped with --no-draw-logprobs has no teacher log-prob at drawn ids: decode stands in each entry's
own weight (log w_j), so at T = 1 the weights and gradient are the same bit for bit, and the reported KD
term is KL(w || student), from the empirical distribution; T != 1 is refused (check_temperature).

Token selection (format v3, `dump-logits --select-positions`): a batch from a selected cache has
`soft_mask` (N,), True where the target has soft targets. How its positions are weighed
(`DistillLoss.selection`; benchmarks/quality.md compares them on held-out text):
  "kd-share"      alpha · mean over selected targets of KD + (1 - alpha) · mean over labelled targets of CE:
                  the KD term keeps the share of the loss it has without selection;
  "per-position"  per target alpha_i = alpha where selected, 0 elsewhere: a selected target adds
                  alpha·KD + (1 - alpha)·CE, an unselected one its CE alone at full weight, averaged over
                  targets as without selection (KD sums over N, CE over the labelled ones);
  "selected-only" the loss of the selected targets alone (unselected ones add nothing; SE-KD's rule).
All three equal the loss above when every target is selected. Without `soft_mask` the loss is exactly
(bit for bit) the one above.

The output layer runs per chunk of targets under activation checkpointing, so at most one
chunk's (targets x vocab) logits exist at a time, in the forward and in the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..cache.kinds import kind_of
from ..cache.kinds.base import TARGET_KEYS
from ..errors import KdcacheError
from ..cache.schema import SAMPLE as _SAMPLE, TOP_K as _TOP_K

TOPK, SAMPLE = kind_of(_TOP_K), kind_of(_SAMPLE)  # whose weights batches with and without draw counts use

TAILS = ("renorm", "bucket")
# How a selected cache's loss weighs its positions (module docstring), the default first.
SELECTION_WEIGHTINGS = ("kd-share", "per-position", "selected-only")
# Logit elements per chunk (targets x vocab): 16M fp32 = 64 MiB per chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p - log q) per row, with 0·log 0 = 0 (entries the teacher gives no mass)."""
    p = log_p.exp()
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return (p * (safe_log_p - log_q)).sum(-1)


def cached_kd_per_target(log_q: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                         temperature: float, tail: str = "renorm") -> torch.Tensor:
    """KD loss per target (already × T²) against the cached top-k teacher log-probs (T = 1).
    log_q: the student's full log-softmax at temperature T, (N, V)."""
    log_q_k = log_q.gather(1, topk_ids)
    teacher = topk_logprobs.to(log_q.dtype)
    if tail == "renorm":
        log_p = (teacher / temperature).log_softmax(-1)
        kl = _kl(log_p, log_q_k)
    elif tail == "bucket":
        # Teacher rest mass at T = 1 is exact (1 - top-k mass); at T != 1 it is scaled as if it
        # were one token, the best the cache allows. fp16 rounding may push the top-k mass past 1.
        rest = (-torch.expm1(teacher.logsumexp(-1, keepdim=True))).clamp(min=0)
        log_p = (torch.cat([teacher, rest.log()], -1) / temperature).log_softmax(-1)
        # Student rest: log-sum-exp over the ids outside the top-k, exactly (a large finite
        # negative instead of -inf keeps the gradient finite when k = vocab).
        in_topk = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, topk_ids, True)
        log_q_rest = log_q.masked_fill(in_topk, -1e30).logsumexp(-1, keepdim=True)
        kl = _kl(log_p, torch.cat([log_q_k, log_q_rest], -1))
    else:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return kl * temperature ** 2


def online_kd_per_target(log_q: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD loss per target (× T²) against a live teacher's full softmax; log_q as above."""
    log_p = (teacher_logits.to(log_q.dtype) / temperature).log_softmax(-1)
    return _kl(log_p, log_q) * temperature ** 2


def sparse_target_weights(logprobs: torch.Tensor, counts: torch.Tensor | None, head: int,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-id target weights and the log-probs to measure the KL with, from a batch's soft targets.

    logprobs (N, W): the teacher's log-softmax at T = 1 at each stored id (padding: -inf).
    counts (N, W) or None: draws per id (sampled kinds; 0 for the `head` leading top-k columns and
    padding), None for top-k targets.
    Returns (w, log_p): w sums to 1 per target (0 on padding); log_p is log w for top-k targets and
    the (estimated) teacher log-prob at T for sampled ones (0 on padding, where w = 0).

      top-k:         w = softmax(logprobs / T)                                  (renormalised top-k)
      sample:        w_j ∝ count_j · p_j^(1/T - 1)                               (T = 1: count_j / N)
      top-k+sample:  head w_i ∝ p_i^(1/T); drawn w_j ∝ (1 - Σ_head p) · count_j/N · p_j^(1/T - 1)
                     (T = 1: the head's exact p_i and tail mass × count_j / N)
    """
    # The formulas live with their kinds (kdcache/cache/kinds/): top-k renormalises, drawn kinds weigh by counts.
    return (TOPK if counts is None else SAMPLE).weights(logprobs, counts, head, temperature)


def check_temperature(temperature: float, draw_logprobs: bool, cache) -> None:
    """At T != 1 the weights of drawn ids read the teacher's log-prob at each (above); a cache dumped with
    --no-draw-logprobs (manifest targets "draw_logprobs": false) stores counts only, exact at T = 1 alone."""
    if temperature != 1 and not draw_logprobs:
        raise KdcacheError(f"temperature {temperature} needs the teacher's log-prob at each drawn id; {cache} was "
                           "dumped with --no-draw-logprobs (counts only, exact at T = 1 alone): train at "
                           "--temperature 1, or re-dump with --draw-logprobs")


class _SparseTargetCE(torch.autograd.Function):
    """KL / cross-entropy against sparse target distributions, fused:

      kd   = T² Σ_n Σ_j w[n,j] · (log w[n,j] - log softmax(z_n / T)[ids[n,j]])   (w: a distribution)
      hard = Σ_n h[n] · -log softmax(z_n)[label_n]

    Autograd through log_softmax + gather + nll would build several (N, V) tensors (log-probs,
    one scattered gradient per term, their sum); the gradient here is formed in one buffer:
    dz = h_sum·q₁ + T·w_sum·q_T − scatter(w·T, ids) − scatter(h, labels), q = softmax.

    Also returns each target's CE, (N, 1), without a gradient (unlabelled rows: meaningless).
    """

    @staticmethod
    def forward(ctx, logits, ids, weights, log_weights, labels, label_weights, temperature):
        lse1 = logits.logsumexp(-1, keepdim=True)
        ce = lse1 - logits.gather(1, labels)
        hard = (label_weights * ce).sum()
        lse_t = None
        kd = logits.new_zeros(())
        if ids is not None:
            if temperature == 1:
                lse_t, picked = lse1, logits.gather(1, ids)
            else:
                lse_t, picked = (logits / temperature).logsumexp(-1, keepdim=True), logits.gather(1, ids) / temperature
            # Summed per element as a KL (not CE - entropy) so tiny divergences keep their precision.
            kd = (weights * (log_weights - picked + lse_t)).sum() * temperature ** 2
        ctx.temperature = temperature
        ctx.save_for_backward(logits, ids, weights, labels, label_weights, lse1, lse_t)
        ctx.mark_non_differentiable(ce)
        return kd, hard, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_hard, grad_ce):
        logits, ids, weights, labels, label_weights, lse1, lse_t = ctx.saved_tensors
        t = ctx.temperature
        hard_coef = grad_hard * label_weights  # (N, 1)
        grad = torch.exp(logits - lse1)
        if ids is None:
            grad.mul_(hard_coef)
        else:
            kd_w = weights * (grad_kd * t)  # d kd / d z = T (q_T Σw - scatter(w))
            if t == 1:
                grad.mul_(hard_coef + kd_w.sum(-1, keepdim=True))
            else:
                grad.mul_(hard_coef).add_(torch.exp(logits / t - lse_t).mul_(kd_w.sum(-1, keepdim=True)))
            grad.scatter_add_(1, ids, -kd_w)
        grad.scatter_add_(1, labels, -hard_coef)
        return grad, None, None, None, None, None, None


# -- the pieces: each a sum over the targets it is given, on logits (N, V) at those targets ------

def sparse_kd_and_ce(logits: torch.Tensor, labels: torch.Tensor, soft: dict | None = None,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, hard-label CE sum) against the cached soft targets, fused in one pass.

    soft: the batch's cached targets for these rows ({"target_ids", "target_logprobs"} and, for the
    sampled kinds, "target_counts" and "target_head"), or None for the CE alone (KD sum 0). From a
    selected cache, include its "soft_mask": the KD sum is then over the selected targets (and the CE over
    all, unweighted; DistillLoss's weightings of a selected cache are selected_kd_and_ce).
    Every target kind works (see `sparse_target_weights`). labels: (N,), -1 = unknown.
    """
    known = (labels >= 0).unsqueeze(-1).to(logits.dtype)
    labels_at = labels.clamp(min=0).unsqueeze(-1)
    if soft is None:
        kd, hard, _ = _SparseTargetCE.apply(logits, None, None, None, labels_at, known, 1.0)
        return hard.new_zeros(()), hard
    w, log_w = _soft_weights(soft, logits.dtype, temperature)
    return _SparseTargetCE.apply(logits, soft["target_ids"].long(), w, log_w, labels_at, known, float(temperature))[:2]


def _soft_weights(soft: dict, dtype, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_target_weights of a batch's soft targets; with soft_mask (a selected cache) the unselected
    rows, which hold only padding (their weights come out NaN), get none: no KD there."""
    w, log_w = sparse_target_weights(soft["target_logprobs"].to(dtype), soft.get("target_counts"),
                                     int(soft.get("target_head", 0)), temperature)
    mask = soft.get("soft_mask")
    if mask is not None:
        selected = mask.unsqueeze(-1)
        w, log_w = torch.where(selected, w, 0.0), torch.where(selected, log_w, 0.0)
    return w, log_w


def unselected_ce_weight(alpha: float, weighting: str) -> float:
    """The CE weight of a target without soft targets in a selected cache (a selected one's is 1 - alpha)."""
    return {"kd-share": 1 - alpha, "per-position": 1.0, "selected-only": 0.0}[weighting]


def selected_kd_and_ce(logits: torch.Tensor, labels: torch.Tensor, soft: dict, soft_mask: torch.Tensor,
                       alpha: float, temperature: float = 1.0, weighting: str = "per-position") -> torch.Tensor:
    """[KD sum, weighted CE sum, CE sum] for a selected cache's targets (soft_mask (N,) bool: which have
    soft targets), fused in one pass like sparse_kd_and_ce. The weighted CE counts a selected target's
    CE (1 - alpha) times and an unselected one's unselected_ce_weight times (DistillLoss divides the sums)."""
    known = labels >= 0
    labels_at = labels.clamp(min=0).unsqueeze(-1)
    w, log_w = _soft_weights({**soft, "soft_mask": soft_mask}, logits.dtype, temperature)
    label_weights = ((known & soft_mask).to(logits.dtype) * (1 - alpha)
                     + (known & ~soft_mask).to(logits.dtype) * unselected_ce_weight(alpha, weighting))
    kd, hard, ce = _SparseTargetCE.apply(logits, soft["target_ids"].long(), w, log_w, labels_at,
                                         label_weights.unsqueeze(-1), float(temperature))
    return torch.stack([kd, hard, (ce.squeeze(-1) * known.to(ce.dtype)).sum()])


def hard_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy, summed over the labelled targets (labels -1 are skipped)."""
    return sparse_kd_and_ce(logits, labels)[1]


def online_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(teacher at T || student at T) against a live teacher's full softmax, summed."""
    log_q = (logits / temperature).log_softmax(-1) if temperature != 1 else logits.log_softmax(-1)
    return online_kd_per_target(log_q, teacher_logits, temperature).sum()


def bucket_kd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """KD over a top-k cache's ids plus one "rest" bucket holding the mass outside them, summed."""
    log_q = (logits / temperature).log_softmax(-1) if temperature != 1 else logits.log_softmax(-1)
    return cached_kd_per_target(log_q, topk_ids.long(), topk_logprobs, temperature, "bucket").sum()


def mix(kd: torch.Tensor, hard: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · KD + (1 - alpha) · hard (alpha = 1: the KD term alone, even where hard is nan)."""
    return alpha * kd + (1 - alpha) * hard if alpha < 1 else kd


def chunked(hidden: torch.Tensor, head, fn, per_target: dict, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Σ over chunks of targets of fn(logits, part): the output layer `head` runs on at most
    chunk_elements // vocab targets at a time, under activation checkpointing, so at most one
    chunk's (targets × vocab) logits exist at once, in the forward and in the backward pass.

    hidden: (N, H) features at the targets; head: features -> logits (identity when hidden
    already holds the logits); per_target: tensors with N rows (sliced per chunk; None and
    plain numbers pass through); fn(logits (n, V) in fp32 at least, part) -> a tensor of sums.
    """
    vocab = _out_features(head, hidden)
    chunk = max(1, chunk_elements // max(vocab, 1))
    n = hidden.shape[0]
    if n <= chunk:
        return _chunk(fn, hidden, head, per_target)
    total = None
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        rows = {key: value[part] if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in per_target.items()}
        # Recompute this chunk's logits in the backward pass instead of keeping them.
        sums = checkpoint(_chunk, fn, hidden[part], head, rows, use_reentrant=False)
        total = sums if total is None else total + sums
    return total


def _chunk(fn, hidden, head, rows):
    return fn(_at_least_fp32(head(hidden)), rows)


@dataclass
class LossOutput:
    loss: torch.Tensor        # what to backpropagate
    kd: torch.Tensor          # mean KD term over targets (0 when alpha = 0; a selected cache: over the selected)
    hard: torch.Tensor        # mean hard-label CE over labelled targets (0 when none)
    num_targets: int
    num_labelled: int


SOFT_KEYS = TARGET_KEYS + ("soft_mask",)


@dataclass
class DistillLoss:
    """The distillation loss train-student uses, composed from the pieces above:
    mix(mean KD, mean hard CE, alpha), the KD term from the cache (sparse_kd_and_ce, or
    bucket_kd for tail="bucket") or from a live teacher (online_kd), over a chunked head."""
    temperature: float = 1.0
    alpha: float = 0.5
    tail: str = "renorm"
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    selection: str = SELECTION_WEIGHTINGS[0]  # a selected cache's weighting (module docstring)

    def __post_init__(self):
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.selection not in SELECTION_WEIGHTINGS:
            raise ValueError(f"selection must be one of {SELECTION_WEIGHTINGS}, got {self.selection!r}")

    @property
    def uses_soft_targets(self) -> bool:
        return self.alpha > 0

    def _sums(self, logits: torch.Tensor, part: dict) -> torch.Tensor:
        """[KD sum, hard CE sum] of one chunk of targets; with soft_mask (a selected cache), [KD sum,
        weighted CE sum, CE sum] (see selected_kd_and_ce)."""
        if part.get("soft_mask") is not None:
            return self._selected_sums(logits, part)
        labels, teacher_logits = part["labels"], part.get("teacher_logits")
        if teacher_logits is None and (not self.uses_soft_targets or self.tail == "renorm"):
            kd, hard = sparse_kd_and_ce(logits, labels, part if self.uses_soft_targets else None, self.temperature)
            return torch.stack([kd, hard])
        # Online KD (dense teacher) and the rest bucket: plain autograd.
        log_q1 = logits.log_softmax(-1)  # T = 1: the hard term, and the KD term when T = 1 (one pass)
        kd = logits.new_zeros(())
        if self.uses_soft_targets:
            log_q = log_q1 if self.temperature == 1 else (logits / self.temperature).log_softmax(-1)
            per_target = (online_kd_per_target(log_q, teacher_logits, self.temperature) if teacher_logits is not None
                          else cached_kd_per_target(log_q, part["target_ids"], part["target_logprobs"], self.temperature,
                                                    self.tail))
            kd = per_target.sum()
        # nll of log-probs; ignore_index=-1 makes an all-unknown chunk contribute 0.
        hard = F.nll_loss(log_q1, labels, ignore_index=-1, reduction="sum")
        return torch.stack([kd, hard])

    def _selected_sums(self, logits: torch.Tensor, part: dict) -> torch.Tensor:
        labels, mask = part["labels"], part["soft_mask"]
        if self.tail == "renorm":
            return selected_kd_and_ce(logits, labels, part, mask, self.alpha, self.temperature, self.selection)
        # The rest bucket (top-k targets): plain autograd on the selected rows only.
        log_q1 = logits.log_softmax(-1)
        log_q = log_q1 if self.temperature == 1 else (logits / self.temperature).log_softmax(-1)
        kd = cached_kd_per_target(log_q[mask], part["target_ids"][mask], part["target_logprobs"][mask],
                                  self.temperature, self.tail).sum()
        ce = F.nll_loss(log_q1, labels, ignore_index=-1, reduction="none")
        hard = (ce * torch.where(mask, 1 - self.alpha, unselected_ce_weight(self.alpha, self.selection))).sum()
        return torch.stack([kd, hard, ce.sum()])

    def __call__(self, hidden: torch.Tensor, head, batch: dict, teacher_logits: torch.Tensor | None = None) -> LossOutput:
        """hidden: (N, H) student features at the targets, head: features -> logits;
        batch: its labels and (cached KD) target_ids/target_logprobs; teacher_logits: (N, V) (online KD)."""
        labels = batch["labels"]
        part = {"labels": labels}
        if teacher_logits is not None:
            part["teacher_logits"] = teacher_logits
        elif self.uses_soft_targets:
            if batch.get("target_ids") is None:
                if batch.get("topk_ids") is not None:  # built for kdcache 0.1, whose batches used these names
                    raise KdcacheError("this batch holds its soft targets under topk_ids/topk_logprobs, the names "
                                       "before kdcache 0.2; rename them target_ids/target_logprobs (README: "
                                       "'Changes in 0.2')")
                raise ValueError("alpha > 0 needs the cached soft targets (stream with soft_targets=True) or teacher_logits")
            if batch.get("target_counts") is not None and self.tail == "bucket":
                raise ValueError("tail='bucket' is for top-k targets; sampled targets already estimate the tail")
            part.update({key: batch[key] for key in SOFT_KEYS if batch.get(key) is not None})
            part["target_ids"] = part["target_ids"].long()  # batches carry int32 ids; gather/scatter index with int64
        sums = chunked(hidden, head, self._sums, part, self.chunk_elements)
        n, num_labelled = labels.shape[0], int((labels >= 0).sum())
        mask = part.get("soft_mask")
        if mask is not None:  # a selected cache: weighed as self.selection says (module docstring)
            num_selected = max(int(mask.sum()), 1)
            # Reported: KD averaged where soft targets exist, CE over every labelled target.
            kd_mean = sums[0] / num_selected
            if self.selection == "per-position":
                loss = self.alpha * sums[0] / max(n, 1) + sums[1] / max(num_labelled, 1)
            elif self.selection == "kd-share":
                loss = self.alpha * kd_mean + sums[1] / max(num_labelled, 1)
            else:  # selected-only: the weighted CE sums over the selected labelled targets only
                loss = self.alpha * kd_mean + sums[1] / max(int(((labels >= 0) & mask).sum()), 1)
            return LossOutput(loss, kd_mean.detach(), (sums[2] / max(num_labelled, 1)).detach(), n, num_labelled)
        kd = sums[0] / max(n, 1)
        hard = sums[1] / max(num_labelled, 1)
        return LossOutput(mix(kd, hard, self.alpha), kd.detach(), hard.detach(), n, num_labelled)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax arithmetic in fp32 at least: half-precision logits are upcast, fp64 ones kept
    (a float64 student gets float64 losses, which is what exact comparisons need)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _out_features(head, hidden: torch.Tensor) -> int:
    """Width of the head's output (vocab), without running it."""
    if isinstance(head, torch.nn.Module):
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        if linears:
            return linears[-1].out_features
    return hidden.shape[-1]  # identity head: hidden already holds the logits
