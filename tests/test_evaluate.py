"""kdcache evaluate: numbers checked against a direct forward, and the teacher against itself."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import shakespeare_lines
from kdcache.cache.stream import open_cache
from kdcache.train.evaluate import evaluate
from kdcache.train.students import Sizes, build_student, plan_student
from stage2_helpers import CLM, cli_ok, fp16_top1_ties, teacher_cache


@pytest.fixture(scope="module")
def clm_setup(tmp_path_factory, tiny_llama_clm):
    root = tmp_path_factory.mktemp("eval")
    cache = teacher_cache(root / "cache", tiny_llama_clm, CLM, shakespeare_lines(30), k=8, row_group_rows=4)
    opened = open_cache(cache)
    plan = plan_student("L2-H128", opened.manifest, cache_tokenizer_dir=opened.tokenizer_dir,
                        sizes=Sizes(1, 16, 2, 32))
    torch.manual_seed(3)
    build_student(plan, CLM).save_pretrained(root / "student")
    return cache, root / "student"


def test_teacher_agrees_with_its_own_cache(clm_setup, tiny_llama_clm):
    cache, _ = clm_setup
    m = evaluate(tiny_llama_clm, cache)
    ties, positions = fp16_top1_ties(cache)
    assert m["top1_agreement"] >= 1.0 - ties / positions
    assert m["kl"] < 1e-4  # only the cache's fp16 rounding separates them
    assert m["accuracy"] == m["teacher_accuracy"]
    assert m["positions"] == open_cache(cache).manifest["totals"]["positions"]


def test_student_metrics_match_a_direct_forward(clm_setup):
    from transformers import AutoModelForCausalLM

    cache, student_dir = clm_setup
    got = evaluate(student_dir, cache, batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    agree = correct = labelled = n = near_ties = 0
    ce = kl = 0.0
    for row in pq.read_table(cache / "data").to_pylist():
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0][row["positions"]]
        ids = torch.tensor(row["topk_ids"])
        p = torch.tensor(row["topk_logprobs"]).float().softmax(-1)
        q = logits.gather(1, ids).softmax(-1)
        kl += float((p * (p.log() - q.log())).sum())
        agree += int((logits.argmax(-1) == ids[:, 0]).sum())
        # Where the two best logits are within fp32 noise, a batched forward may pick the other one.
        top2 = logits.topk(2, dim=-1).values
        near_ties += int((top2[:, 0] - top2[:, 1] < 1e-5).sum())
        labels = torch.tensor(row["labels"])
        known = labels >= 0
        correct += int((logits[known].argmax(-1) == labels[known]).sum())
        ce += float(F.cross_entropy(logits[known], labels[known], reduction="sum"))
        labelled += int(known.sum())
        n += len(labels)
    assert got["positions"] == n and got["labelled_positions"] == labelled
    assert got["top1_agreement"] == pytest.approx(agree / n, abs=near_ties / n + 1e-12)
    assert got["accuracy"] == pytest.approx(correct / labelled, abs=near_ties / labelled + 1e-12)
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(ce / labelled), rel=1e-4)
    assert got["kl"] > 1e-3  # an untrained student really differs


def test_cli_json_is_one_object(clm_setup):
    cache, student_dir = clm_setup
    out = cli_ok(["evaluate", "--model", student_dir, "--cache", cache, "--json"])
    metrics = json.loads(out)
    assert set(metrics) >= {"kl", "top1_agreement", "accuracy", "perplexity", "teacher_accuracy"}
    table = cli_ok(["evaluate", "--model", student_dir, "--cache", cache])
    assert "top-1 agreement" in table
