"""Cached KD against an independent online-KD computation from direct teacher/student forwards."""
from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import shakespeare_lines
from kdcache.cache.stream import CacheStream, open_cache
from kdcache.train.forward import target_hidden, target_logits
from kdcache.train.losses import DistillLoss
from kdcache.models import auto_class
from kdcache.train.students import Sizes, build_student, plan_student
from stage2_helpers import CLM, CLS, MLM, teacher_cache

TEACHERS = {MLM: "tiny_bert_mlm", CLM: "tiny_llama_clm", CLS: "tiny_bert_cls"}


def corpus(task, sms_csv):
    if task != CLS:
        return shakespeare_lines(14)[2:], None
    with open(sms_csv) as f:
        rows = list(csv.DictReader(f))[:12]
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def tiny_student(cache_dir, task):
    cache = open_cache(cache_dir)
    plan = plan_student("L2-H128", cache.manifest, cache_tokenizer_dir=cache.tokenizer_dir,
                        sizes=Sizes(layers=1, hidden=16, heads=2, intermediate=32))
    torch.manual_seed(0)
    # eval(): no dropout, so the cached and the reference computation see the same function.
    return cache, build_student(plan, task).eval()


def reference_losses(student, teacher, rows, task, temperature, round_teacher_to_fp16):
    """Per-row, unpadded full forwards; full-vocabulary softmax; no cache code involved.
    The student runs in float64, so what is compared is the arithmetic of the loss, not fp32
    rounding noise that differs between batched and unbatched kernels (and between CPUs)."""
    kd, ce, n, n_labelled = 0.0, 0.0, 0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        s = student(input_ids=ids).logits[0]
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0]
        if task == CLS:
            s, t = s[None], t[None]
        else:
            s, t = s[row["positions"]], t[row["positions"]]
        if round_teacher_to_fp16:  # what the cache stores: the fp32 log-softmax, rounded to fp16
            t_logprobs = t.float().log_softmax(-1).half().double()
        else:
            t_logprobs = t.double().log_softmax(-1)
        p = (t_logprobs / temperature).softmax(-1)
        log_q = (s / temperature).log_softmax(-1)
        kd = kd + (p * (p.log() - log_q)).sum() * temperature ** 2
        labels = torch.tensor(row["labels"])
        known = labels >= 0
        ce = ce + F.cross_entropy(s[known], labels[known], reduction="sum")
        n, n_labelled = n + len(labels), n_labelled + int(known.sum())
    return kd / n, ce / n_labelled


# T = 1 and T != 1 take different branches of the fused gradient; each task gets one of them.
@pytest.mark.parametrize("task, temperature", [(MLM, 2.0), (CLM, 1.0), (CLS, 2.0)])
def test_cached_kd_with_k_equal_vocab_matches_online_full_softmax(task, temperature, request, sms_csv, tmp_path):
    teacher_dir = request.getfixturevalue(TEACHERS[task])
    texts, labels = corpus(task, sms_csv)
    teacher = auto_class(task).from_pretrained(teacher_dir).eval()
    vocab = teacher.config.num_labels if task == CLS else teacher.config.vocab_size
    cache_dir = teacher_cache(tmp_path / "cache", teacher_dir, task, texts, k=vocab, labels=labels)
    cache, student = tiny_student(cache_dir, task)
    student = student.double()  # the loss keeps fp64 logits in fp64; see reference_losses
    rows = pq.read_table(cache_dir / "data").to_pylist()
    batch = next(iter(CacheStream(cache, batch_size=len(rows), shuffle=False)))
    params = [p for p in student.parameters() if p.requires_grad]
    alpha = 0.7
    # chunk_elements = 3 * vocab: several checkpointed chunks of 3 targets for the LM tasks.
    loss_fn = DistillLoss(temperature=temperature, alpha=alpha, chunk_elements=3 * vocab)

    hidden, head = target_hidden(student, task, batch)
    cached = loss_fn(hidden, head, batch)
    cached_grads = torch.autograd.grad(cached.loss, params)

    kd_ref, ce_ref = reference_losses(student, teacher, rows, task, temperature, round_teacher_to_fp16=True)
    ref = alpha * kd_ref + (1 - alpha) * ce_ref
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True)
    # fp64 throughout: agreement to ~1e-12; a wrong term, scale or sign is off by > 1e-4.
    torch.testing.assert_close(cached.kd, kd_ref.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cached.hard, ce_ref.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cached.loss, ref, rtol=1e-9, atol=1e-12)
    for got, want in zip(cached_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    assert cached.kd > 0 and sum(g.abs().sum() for g in cached_grads) > 0

    # Hard labels only (alpha 0): the cross-entropy and its gradients alone.
    hidden, head = target_hidden(student, task, batch)
    hard_only = DistillLoss(alpha=0.0, chunk_elements=3 * vocab)(hidden, head, batch)
    for got, want in zip(torch.autograd.grad(hard_only.loss, params), torch.autograd.grad(ce_ref, params)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)

    # Online mode (live teacher on the same batch, full softmax): equals the unrounded reference.
    # The teacher runs in fp64 here too: its batched and unbatched fp32 logits differ by ~1e-7.
    teacher = teacher.double()
    with torch.no_grad():
        teacher_logits = target_logits(teacher, task, batch)
    hidden, head = target_hidden(student, task, batch)
    online = loss_fn(hidden, head, batch, teacher_logits=teacher_logits)
    kd_exact, _ = reference_losses(student, teacher, rows, task, temperature, round_teacher_to_fp16=False)
    torch.testing.assert_close(online.kd, kd_exact.detach(), rtol=1e-9, atol=1e-12)


def test_bucket_tail_keeps_the_mass_outside_the_top_k(tiny_bert_mlm, tmp_path):
    texts = shakespeare_lines(10)
    cache_dir = teacher_cache(tmp_path / "cache", tiny_bert_mlm, MLM, texts, k=5)
    cache, student = tiny_student(cache_dir, MLM)
    rows = pq.read_table(cache_dir / "data").to_pylist()
    batch = next(iter(CacheStream(cache, batch_size=len(rows), shuffle=False)))
    hidden, head = target_hidden(student, MLM, batch)
    bucket = DistillLoss(temperature=1.0, alpha=1.0, tail="bucket", chunk_elements=4 * 400)(hidden, head, batch)
    renorm = DistillLoss(temperature=1.0, alpha=1.0, tail="renorm")(hidden, head, batch)

    # Independent: probabilities summed directly, the rest as 1 - Σ top-k on both sides.
    q = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    q = q[batch["target_rows"], batch["target_positions"]].softmax(-1)
    p_k = batch["target_logprobs"].float().exp()
    q_k = q.gather(1, batch["target_ids"].long())
    p = torch.cat([p_k, (1 - p_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    qq = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - qq.log())).sum(-1).mean()
    torch.testing.assert_close(bucket.kd, expected.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(bucket.kd, renorm.kd)


def test_batches_name_their_targets_and_old_names_are_refused(tiny_bert_mlm, tmp_path):
    """0.2 renamed the batch keys topk_ids/topk_logprobs (which also held drawn ids) to target_ids/target_logprobs;
    a batch built with the old names is refused in one line instead of training on labels alone."""
    from kdcache.errors import KdcacheError
    cache_dir = teacher_cache(tmp_path / "cache", tiny_bert_mlm, MLM, shakespeare_lines()[:8], k=4)
    batch = next(iter(CacheStream(cache_dir, batch_size=4, shuffle=False)))
    assert {"target_ids", "target_logprobs"} <= batch.keys() and not {"topk_ids", "topk_logprobs"} & batch.keys()
    old = {"labels": batch["labels"], "topk_ids": batch["target_ids"], "topk_logprobs": batch["target_logprobs"]}
    hidden = torch.randn(len(batch["labels"]), 8)
    head = torch.nn.Linear(8, open_cache(cache_dir).manifest["target_vocab_size"])
    with pytest.raises(KdcacheError, match="target_ids/target_logprobs"):
        DistillLoss(alpha=0.5)(hidden, head, old)
    renamed = {"labels": old["labels"], "target_ids": old["topk_ids"], "target_logprobs": old["topk_logprobs"]}
    assert torch.isfinite(DistillLoss(alpha=0.5)(hidden, head, renamed).loss)
