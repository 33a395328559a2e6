"""`kdcache evaluate` on a chat cache: one conversation per row, targets only at the assistant's tokens.

The cache is written by hand (docs/FORMAT.md): each conversation is rendered ChatML-style by
concatenating the token ids of its pieces, so the assistant spans are known exactly; `positions`
lists only the positions whose next token is an assistant token (content or end-of-turn), and the
manifest carries a `chat` key. Evaluate's numbers are checked against a direct per-conversation forward.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import shakespeare_lines
from kdcache.cache.files import atomic_write_json
from kdcache.cache.stream import open_cache
from kdcache.train.evaluate import evaluate
from kdcache.train.students import Sizes, build_student, plan_student
from stage2_helpers import CLM, cli_ok, write_cache


def render(tok, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """(ids of the whole conversation, target positions): p is a target when ids[p + 1] is an
    assistant content or end-of-turn token, never a role header or a user token."""
    ids, targets = [tok.bos_token_id], []
    for message in conversation:
        ids += tok(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
        body = tok(message["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # eos ends a turn
        if message["role"] == "assistant":
            targets += range(len(ids) - 1, len(ids) - 1 + len(body))
        ids += body + tok("\n", add_special_tokens=False)["input_ids"]
    return ids, targets


def conversations(n: int) -> list[list[dict]]:
    lines = shakespeare_lines(4 * n + 3)
    out = []
    for i in range(n):
        turns = 2 + i % 2  # two or three exchanges, so rows have different lengths and several target spans
        out.append([{"role": "user" if t % 2 == 0 else "assistant", "content": lines[(4 * i + t) % len(lines)][:60]}
                    for t in range(2 * turns)])
    return out


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory, tiny_llama_clm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval_chat")
    tok = AutoTokenizer.from_pretrained(tiny_llama_clm)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_clm, dtype=torch.float32).eval()
    k, rows = 8, []
    for i, conversation in enumerate(conversations(9)):
        ids, positions = render(tok, conversation)
        with torch.no_grad():
            logprobs = teacher(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        top = logprobs[positions].topk(k, dim=-1)
        rows.append({"example_id": i, "input_ids": ids, "positions": positions, "topk_ids": top.indices.tolist(),
                     "topk_logprobs": top.values.to(torch.float16).tolist(),
                     "labels": [ids[p + 1] for p in positions]})
    assert all(len(r["positions"]) < len(r["input_ids"]) - 1 for r in rows)  # sparse, not every position
    cache = write_cache(root / "cache", rows, task=CLM, k=k, vocab_size=len(tok),
                        max_length=max(len(r["input_ids"]) for r in rows),
                        shard_rows=4, row_group_rows=2, tokenizer=tok,
                        teacher={"source": str(tiny_llama_clm), "gguf_file": None, "model_type": "llama",
                                 "architecture": "LlamaForCausalLM"},
                        special_token_ids={"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id})
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["chat"] = {"template_sha256": "test", "targets_on": "assistant", "format": "messages"}
    atomic_write_json(cache / "manifest.json", manifest)
    opened = open_cache(cache)
    plan = plan_student("L2-H128", opened.manifest, cache_tokenizer_dir=opened.tokenizer_dir, sizes=Sizes(1, 16, 2, 32))
    torch.manual_seed(5)
    build_student(plan, CLM).save_pretrained(root / "student")
    return cache, root / "student", rows


def direct_metrics(model, rows, *, context: str = "conversation") -> dict:
    """The metrics from one forward per row; context "assistant" feeds only each assistant turn
    (a wrong evaluation, to show the test tells the two apart)."""
    ce = kl = 0.0
    agree = n = 0
    for row in rows:
        ids, positions = row["input_ids"], row["positions"]
        with torch.no_grad():
            if context == "conversation":
                logits = model(input_ids=torch.tensor([ids])).logits[0][positions]
            else:  # each contiguous run of positions (one assistant turn) forwarded alone
                spans, start = [], 0
                for j in range(1, len(positions) + 1):
                    if j == len(positions) or positions[j] != positions[j - 1] + 1:
                        spans.append(positions[start:j])
                        start = j
                logits = torch.cat([model(input_ids=torch.tensor([ids[s[0]:s[-1] + 1]])).logits[0] for s in spans])
        labels = torch.tensor(row["labels"])
        ce += float(F.cross_entropy(logits, labels, reduction="sum"))
        ids_k = torch.tensor(row["topk_ids"])
        p = torch.tensor(row["topk_logprobs"]).float().softmax(-1)
        q = logits.gather(1, ids_k).softmax(-1)
        kl += float((p * (p.log() - q.log())).sum())
        agree += int((logits.argmax(-1) == ids_k[:, 0]).sum())
        n += len(positions)
    return {"perplexity": math.exp(ce / n), "kl": kl / n, "top1_agreement": agree / n, "positions": n}


def test_assistant_token_metrics_match_a_direct_forward_over_each_conversation(chat_setup):
    from transformers import AutoModelForCausalLM

    cache, student_dir, rows = chat_setup
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    want = direct_metrics(model, rows)
    for batch_size in (1, 4):  # 4: conversations of different lengths padded together
        got = evaluate(student_dir, cache, batch_size=batch_size)
        assert got["token_scope"] == "assistant-token"
        assert got["positions"] == got["labelled_positions"] == want["positions"]
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)  # fp32 noise of batching only
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-5)
        assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-9)
    # The context matters: scoring the assistant turns without the conversation before them is told
    # apart (an untrained student leans little on context, hence the tight tolerances above).
    wrong = direct_metrics(model, rows, context="assistant")
    assert abs(wrong["perplexity"] / want["perplexity"] - 1) > 1e-4
    assert abs(wrong["kl"] / want["kl"] - 1) > 1e-4


def test_cli_labels_assistant_token_metrics(chat_setup):
    cache, student_dir, _ = chat_setup
    table = cli_ok(["evaluate", "--model", student_dir, "--cache", cache])
    assert "assistant-token perplexity" in table and "assistant-token KL" in table
    assert "assistant-token top-1 agreement" in table
    assert json.loads(cli_ok(["evaluate", "--model", student_dir, "--cache", cache, "--json"]))["token_scope"] == \
        "assistant-token"
