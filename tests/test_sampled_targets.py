"""Sampled soft targets (RS-KD), on random logits: the draws are keyed by (seed, example id,
position) alone, and the cached loss's gradient is an unbiased estimate of full-softmax KD's
(error shrinking like 1/sqrt(draws)) while top-k's stays biased.

The reference is the analytic gradient of KL(p || softmax(z)) with respect to z: softmax(z) - p.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.dump.targets import draw_uniforms, sampled_targets, topk_targets
from kdcache.train.losses import DistillLoss, sparse_target_weights

VOCAB, POSITIONS = 40, 3


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(POSITIONS, VOCAB, generator=g, dtype=torch.float64) * 2.5
    student = torch.randn(POSITIONS, VOCAB, generator=g, dtype=torch.float64)
    return teacher.float(), student


def draw(teacher, replicas, samples, head=0, seed=0):
    """Every position drawn `replicas` times, as example ids 0..replicas-1 (independent keys), in the
    layout a training batch has: head columns, then distinct draws padded with log-prob -inf."""
    logits = teacher.expand(replicas, -1, -1)
    rows = torch.arange(replicas).repeat_interleave(POSITIONS)
    positions = torch.arange(POSITIONS).repeat(replicas)
    out = sampled_targets(logits, rows, positions, rows, seed=seed, samples=samples, head=head)
    assert out["finite"].all()
    ids, lps, counts = out["ids"], out["logprobs"].float(), out["counts"]
    lps = lps.masked_fill(counts == 0, float("-inf"))
    if head:
        ids = torch.cat([out["head_ids"], ids], 1)
        lps = torch.cat([out["head_logprobs"].float(), lps], 1)
        counts = torch.cat([torch.zeros_like(out["head_ids"]), counts], 1)
    return {"target_ids": ids, "target_logprobs": lps.half(), "target_counts": counts, "target_head": head}


def cached_gradients(student, batch, temperature=1.0):
    """d(per-target KD)/d(student logits) for every target of `batch`, through DistillLoss."""
    n = batch["target_ids"].shape[0]
    z = student.repeat(n // POSITIONS, 1).clone().requires_grad_(True)
    batch = dict(batch, labels=torch.full((n,), -1))
    out = DistillLoss(temperature=temperature, alpha=1.0)(z, lambda h: h, batch)
    (out.loss * n).backward()  # the loss is the mean over targets
    return z.grad.view(-1, POSITIONS, VOCAB)


def online_gradient(teacher, student):
    return student.softmax(-1) - teacher.double().softmax(-1)


@pytest.mark.parametrize("head", [0, 4], ids=["sample", "top-k+sample"])
def test_cached_gradient_is_unbiased_and_top_k_is_not(logits, head):
    teacher, student = logits
    exact = online_gradient(teacher, student)
    replicas = 1500
    grads = cached_gradients(student, draw(teacher, replicas, samples=16, head=head))
    mean = grads.mean(0)
    se = grads.std(0) / replicas ** 0.5
    error = (mean - exact).abs()
    # Every entry within a few standard errors (ids never drawn have no spread: their p is tiny).
    assert (error <= 5 * se + 2e-4).all(), float((error / (se + 1e-12)).max())

    # Top-k renormalisation (k = head, or 4) is deterministic and biased: its error is many times larger.
    k = head or 4
    ids, values, _ = topk_targets(teacher[None], torch.zeros(POSITIONS, dtype=torch.long), torch.arange(POSITIONS), k)
    topk_grad = cached_gradients(student, {"target_ids": ids, "target_logprobs": values})[0]
    topk_error = (topk_grad - exact).abs()
    assert topk_error.max() > 20 * error.max()
    assert topk_error.max() > 20 * se.max()


@pytest.mark.parametrize("head", [0, 4], ids=["sample", "top-k+sample"])
def test_gradient_error_shrinks_like_one_over_sqrt_draws(logits, head):
    teacher, student = logits
    exact = online_gradient(teacher, student)
    rms = {}
    for samples in (4, 64):
        grads = cached_gradients(student, draw(teacher, 400, samples=samples, head=head, seed=samples))
        rms[samples] = float(((grads - exact) ** 2).mean().sqrt())
    # 16x the draws: a quarter of the error (sampling noise only; no bias left to floor it).
    assert 3.2 < rms[4] / rms[64] < 4.8, rms


def test_weights_at_t1_are_counts_over_n_and_head_probabilities(logits):
    teacher, _ = logits
    batch = draw(teacher, 5, samples=16, head=4)
    w, log_p = sparse_target_weights(batch["target_logprobs"].float(), batch["target_counts"], 4, 1.0)
    lp = batch["target_logprobs"].float()
    head_p = lp[:, :4].exp()
    tail = 1 - head_p.sum(-1, keepdim=True)
    counts = batch["target_counts"][:, 4:].float()
    torch.testing.assert_close(w[:, :4], head_p)
    torch.testing.assert_close(w[:, 4:], tail * counts / 16)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
    torch.testing.assert_close(log_p[lp > float("-inf")], lp[lp > float("-inf")])
    # Pure sampling: exactly count / N.
    batch = draw(teacher, 5, samples=16)
    w, _ = sparse_target_weights(batch["target_logprobs"].float(), batch["target_counts"], 0, 1.0)
    torch.testing.assert_close(w, batch["target_counts"].float() / 16)


@pytest.mark.parametrize("head", [0, 4], ids=["sample", "top-k+sample"])
def test_self_normalised_weights_at_t2_converge_to_the_tempered_teacher(logits, head):
    teacher, _ = logits
    temperature = 2.0
    batch = draw(teacher, 1, samples=20000, head=head)
    w, _ = sparse_target_weights(batch["target_logprobs"].float(), batch["target_counts"], head, temperature)
    dense = torch.zeros(POSITIONS, VOCAB).scatter_add_(1, batch["target_ids"].long(), w)
    target = (teacher / temperature).softmax(-1)
    assert (dense - target).abs().max() < 0.02


def test_draws_depend_only_on_seed_example_and_position(logits):
    teacher, _ = logits
    logits3 = torch.stack([teacher, teacher.flip(0), teacher * 0.5])  # three rows, positions 0..2 each
    rows = torch.arange(3).repeat_interleave(POSITIONS)
    positions = torch.arange(POSITIONS).repeat(3)
    example_ids = torch.tensor([7, 3, 11]).repeat_interleave(POSITIONS)
    full = sampled_targets(logits3, rows, positions, example_ids, seed=5, samples=16, head=2)
    # Row 1 alone, in a batch of its own (a different batch index), and through tiny chunks.
    alone = sampled_targets(logits3[1:2], torch.zeros(POSITIONS, dtype=torch.long), torch.arange(POSITIONS),
                            torch.full((POSITIONS,), 3), seed=5, samples=16, head=2, chunk_elements=VOCAB)
    for key in ("head_ids", "head_logprobs", "ids", "logprobs", "counts"):
        assert torch.equal(full[key][POSITIONS:2 * POSITIONS], alone[key]), key
    # Another seed, or another example id, draws differently.
    other_seed = sampled_targets(logits3, rows, positions, example_ids, seed=6, samples=16, head=2)
    other_id = sampled_targets(logits3, rows, positions, example_ids + 1, seed=5, samples=16, head=2)
    assert not torch.equal(full["ids"], other_seed["ids"])
    assert not torch.equal(full["ids"], other_id["ids"])
    # Structure: counts sum to N, ids distinct per position and outside the head, most probable first.
    counts, ids = full["counts"], full["ids"]
    assert (counts.sum(1) == 16).all()
    for i in range(len(ids)):
        drawn = ids[i][counts[i] > 0].tolist()
        assert len(set(drawn)) == len(drawn) and not set(drawn) & set(full["head_ids"][i].tolist())
        lp = full["logprobs"][i][counts[i] > 0].float()
        assert (lp[1:] <= lp[:-1]).all()


def test_uniforms_are_uniform():
    u = draw_uniforms(0, torch.arange(2000).repeat_interleave(10), torch.arange(10).repeat(2000), 10).numpy()
    assert u.min() >= 0 and u.max() < 1
    hist, _ = np.histogram(u, bins=20, range=(0, 1))
    expected = u.size / 20
    assert np.abs(hist - expected).max() < 5 * np.sqrt(expected)
    # Neighbouring draws are uncorrelated.
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.02


def test_a_zero_probability_tail_draws_nothing():
    logits = torch.full((1, 1, 6), -1e4)
    logits[0, 0, :2] = 0.0  # all mass on two ids; the top-2 head takes it, the tail is empty
    out = sampled_targets(logits, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                          torch.zeros(1, dtype=torch.long), seed=0, samples=8, head=2)
    assert (out["counts"] == 0).all() and out["finite"].all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_plus_sample_with_one_id_left_is_exact_kd(logits, temperature):
    """With k = vocab - 1 the tail is a single id, drawn N times: its weight is the tail mass, so the
    cached loss and gradient equal online full-softmax KD, at T = 1 and at T != 1 alike."""
    teacher, student = logits
    batch = draw(teacher, 1, samples=8, head=VOCAB - 1)
    assert (batch["target_counts"][:, VOCAB - 1] == 8).all()
    # Exact log-probs instead of the stored fp16 ones: the tail mass is 1 - (sum of 39 head probabilities),
    # and fp16 rounding of those is as large as the smallest probability itself.
    exact = teacher.double().log_softmax(-1).gather(1, batch["target_ids"].long())
    batch["target_logprobs"] = exact.masked_fill(batch["target_logprobs"] == float("-inf"), float("-inf"))
    labels = torch.full((POSITIONS,), -1)
    z = student.clone().requires_grad_(True)
    cached = DistillLoss(temperature=temperature, alpha=1.0)(z, lambda h: h, dict(batch, labels=labels))
    cached.loss.backward()
    y = student.clone().requires_grad_(True)
    online = DistillLoss(temperature=temperature, alpha=1.0)(y, lambda h: h, {"labels": labels},
                                                             teacher_logits=teacher.double())
    online.loss.backward()
    torch.testing.assert_close(cached.kd, online.kd, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z.grad, y.grad, rtol=1e-9, atol=1e-9)
