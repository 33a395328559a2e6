"""Chat corpora in stage one: the cached targets are exactly the assistant's tokens plus its end-of-turn
marker, checked token by token against an independent rendering, for three template layouts; cached
log-probs equal a direct teacher forward; layouts, bad rows, refusals, identity, resume and torchrun."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_helpers import (
    CHATML_SMOLLM2, CONVERSATIONS, DEFAULT_SYSTEM, LLAMA3, MERGING, ZEPHYR, chat_teacher, many_conversations,
    train_chat_tokenizer, write_jsonl,
)
from conftest import single_thread_env
from dump_helpers import assert_same_rows, dump, manifest, read_rows
from stage2_helpers import cli_error, cli_ok
from test_dump_correctness import check_targets, direct_logprobs
from test_dump_resume import kill_after_first_shard

K = 8
# (name, template passed with --chat-template or None for the teacher's own, end-of-turn marker, trims content)
TEMPLATES = [("chatml-smollm2", None, "<|im_end|>", False),
             ("zephyr", ZEPHYR, "</s>", False),
             ("llama3", LLAMA3, "<|eot_id|>", True)]


@pytest.fixture(scope="module")
def chat_tokenizer():
    return train_chat_tokenizer()


@pytest.fixture(scope="module")
def chatml_teacher(tmp_path_factory, chat_tokenizer):
    """A teacher whose tokenizer carries SmolLM2's own ChatML template."""
    return chat_teacher(tmp_path_factory.mktemp("chatml_teacher"), chat_tokenizer, CHATML_SMOLLM2)


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory, chat_tokenizer):
    """The same weights and vocabulary, but no chat template: --chat-template is required."""
    return chat_teacher(tmp_path_factory.mktemp("plain_teacher"), chat_tokenizer, None)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])


def template_file(tmp_path, text):
    path = tmp_path / "template.jinja"
    path.write_text(text)
    return path


def dump_with(template, chatml_teacher, plain_teacher, data, out, tmp_path, *extra):
    if template is None:
        return dump(chatml_teacher, data, out, "--targets", "top-k", "--top-k", K, *extra)
    return dump(plain_teacher, data, out, "--targets", "top-k", "--top-k", K, "--chat-template", template_file(tmp_path, template), *extra)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs_of(positions: list[int]) -> list[list[int]]:
    """Target positions cut into runs of consecutive positions (one run per assistant turn)."""
    runs = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def other_spans(text: str, messages: list[dict], trims: bool, extra: tuple[str, ...] = ()) -> list[tuple[int, int]]:
    """Character spans of every non-assistant message's content in the rendered text (found in order),
    plus any `extra` text (the default system prompt)."""
    spans, cursor = [], 0
    for m in messages:
        content = m["content"].strip() if trims else m["content"]
        if not content:
            continue
        start = text.find(content, cursor)
        assert start >= 0, (content, text)
        cursor = start + len(content)
        if m["role"] != "assistant":
            spans.append((start, cursor))
    for piece in extra if messages[0]["role"] != "system" else ():  # a default system prompt stands in for none
        start = text.find(piece)
        assert start >= 0
        spans.append((start, start + len(piece)))
    return spans


def check_alignment(cache, tokenizer, conversations, template: str, eot: str, trims: bool, extra=(), kept=None) -> None:
    """The independent check: per conversation, the decoded targets joined per turn equal each assistant
    message's content (trimmed where the template trims) plus the end-of-turn marker, and no target token
    overlaps a user/system/tool message (or the template's default system prompt) in the rendered text."""
    rows = read_rows(cache)
    kept = list(range(len(conversations))) if kept is None else kept  # example ids expected in the cache
    assert [r["example_id"] for r in rows] == kept
    for row, messages in zip(rows, [conversations[i] for i in kept]):
        ids, positions = row["input_ids"], row["positions"]
        assert row["labels"] == [ids[p + 1] for p in positions]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        expected = [(c.strip() if trims else c) + eot for c in replies]
        assert [decode(tokenizer, [ids[p + 1] for p in run]) for run in runs_of(positions)] == expected
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert encoded["input_ids"][:len(ids)] == ids  # the row is the rendered conversation's tokens
        forbidden = other_spans(text, messages, trims, extra)
        for p in positions:
            start, stop = encoded["offset_mapping"][p + 1]
            assert not any(start < b and a < stop for a, b in forbidden), (text[start:stop], messages)


@pytest.mark.parametrize("name,template,eot,trims", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_targets_are_exactly_the_assistant_tokens(tmp_path, chat_tokenizer, chatml_teacher, plain_teacher,
                                                  conversations, name, template, eot, trims):
    out = tmp_path / "cache"
    dump_with(template, chatml_teacher, plain_teacher, conversations, out, tmp_path)
    text = template or CHATML_SMOLLM2
    extra = (DEFAULT_SYSTEM,) if template is None else ()
    check_alignment(out, chat_tokenizer, CONVERSATIONS, text, eot, trims, extra)
    m = manifest(out)
    assert m["chat"]["targets_on"] == "assistant" and m["chat_summary"]["end_of_turn"] == eot
    assert m["chat_summary"]["conversations"] == len(CONVERSATIONS) and m["chat_summary"]["misaligned"] == 0
    # The template travels with the cache's tokenizer, so a student copying it chats like the teacher.
    assert AutoTokenizer.from_pretrained(out / "tokenizer").chat_template == text
    if template is None:  # SmolLM2's template inserts its default system prompt: it is in the rows, never a target
        row = read_rows(out)[0]
        assert DEFAULT_SYSTEM in decode(chat_tokenizer, row["input_ids"])
        assert DEFAULT_SYSTEM not in decode(chat_tokenizer, [row["input_ids"][p + 1] for p in row["positions"]])


def test_cached_logprobs_equal_a_direct_forward_of_the_rendered_conversation(tmp_path, chat_tokenizer, chatml_teacher,
                                                                           conversations):
    out = tmp_path / "cache"
    dump(chatml_teacher, conversations, out, "--targets", "top-k", "--top-k", K, "--max-tokens-per-batch", 96)  # several padded batches
    model = AutoModelForCausalLM.from_pretrained(chatml_teacher).eval()
    for row, messages in zip(read_rows(out), CONVERSATIONS):
        text = chat_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=CHATML_SMOLLM2)
        ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        logprobs = direct_logprobs(model, ids)  # the whole conversation, alone, unpadded
        check_targets(row, logprobs[row["positions"]], K)


def test_targets_on_last_assistant_and_all(tmp_path, chat_tokenizer, chatml_teacher, conversations):
    last, every = tmp_path / "last", tmp_path / "all"
    dump(chatml_teacher, conversations, last, "--top-k", K, "--targets-on", "last-assistant")
    dump(chatml_teacher, conversations, every, "--top-k", K, "--targets-on", "all")
    for row, messages in zip(read_rows(last), CONVERSATIONS):
        (run,) = runs_of(row["positions"])
        assert decode(chat_tokenizer, [row["input_ids"][p + 1] for p in run]) == messages[-1]["content"] + "<|im_end|>"
    for row, messages in zip(read_rows(every), CONVERSATIONS):
        text = chat_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=CHATML_SMOLLM2)
        assert row["input_ids"] == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row["positions"] == list(range(len(row["input_ids"]) - 1))


def test_long_conversations_are_cut_at_a_turn_boundary(tmp_path, chat_tokenizer, chatml_teacher, conversations):
    full = read_rows_of(tmp_path / "full", chatml_teacher, conversations)
    first = full[0]
    # room for the first exchange of conversation 0 but not its second: cut right after the first <|im_end|>
    end_of_first_turn = runs_of(first["positions"])[0][-1] + 2
    limit = end_of_first_turn + 3
    out = tmp_path / "cut"
    dump(chatml_teacher, conversations, out, "--targets", "top-k", "--top-k", K, "--max-length", limit)
    rows = read_rows(out)
    assert rows[0]["input_ids"] == first["input_ids"][:end_of_first_turn]
    assert rows[0]["positions"] == runs_of(first["positions"])[0]
    assert all(len(r["input_ids"]) <= limit for r in rows)
    counts = manifest(out)["chat_summary"]
    assert counts["truncated_at_turn"] >= 1 and counts["truncated_at_turn"] + counts["truncated_mid_turn"] == sum(
        len(r["input_ids"]) > limit for r in full)


def test_dry_run_renders_and_counts_without_the_teacher(tmp_path, capsys, chatml_teacher, conversations):
    _, stdout, _ = dump(chatml_teacher, conversations, tmp_path / "dry", "--targets", "top-k", "--top-k", K, "--dry-run", capsys=capsys)
    targets = sum(len(c) for c in [[m for m in conv if m["role"] == "assistant"] for conv in CONVERSATIONS])
    assert f"dry run: {len(CONVERSATIONS)} rows" in stdout and "the teacher was not run" in stdout
    assert f"Chat: {len(CONVERSATIONS)} conversations, {sum(map(len, CONVERSATIONS))} turns, {targets} assistant turns" in stdout
    assert not (tmp_path / "dry").exists()


def read_rows_of(out, teacher, data):
    dump(teacher, data, out, "--targets", "top-k", "--top-k", K)
    return read_rows(out)


def test_sharegpt_and_alpaca_layouts_equal_the_messages_layout(tmp_path, capsys, chatml_teacher, conversations):
    reference = read_rows_of(tmp_path / "messages", chatml_teacher, conversations)
    roles = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                                      for m in c]} for i, c in enumerate(CONVERSATIONS)]))
    _, stdout, _ = dump(chatml_teacher, sharegpt, tmp_path / "sharegpt", "--targets", "top-k", "--top-k", K, capsys=capsys)
    assert "ShareGPT layout" in stdout
    assert_same_rows(read_rows(tmp_path / "sharegpt"), reference)

    alpaca = [{"instruction": "Name a king.", "input": "", "output": " Duncan, king of Scotland."},
              {"instruction": "Translate this.", "input": "Bonjour", "output": "\nGood day."}]
    write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    as_messages = [{"messages": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
                                 {"role": "assistant", "content": r["output"]}]} for r in alpaca]
    # and a --messages-column other than "messages"
    write_jsonl(tmp_path / "as_messages.jsonl", [{"chat": r["messages"], "text": "ignored"} for r in as_messages])
    _, stdout, _ = dump(chatml_teacher, tmp_path / "alpaca.jsonl", tmp_path / "alpaca", "--targets", "top-k", "--top-k", K, capsys=capsys)
    assert "Alpaca" in stdout
    dump(chatml_teacher, tmp_path / "as_messages.jsonl", tmp_path / "as_messages", "--targets", "top-k", "--top-k", K,
         "--messages-column", "chat")
    assert_same_rows(read_rows(tmp_path / "alpaca"), read_rows(tmp_path / "as_messages"))


def test_bad_rows_are_reported_by_index_or_refused_with_strict(tmp_path, capsys, chatml_teacher):
    rows = [{"messages": CONVERSATIONS[0]},
            {"messages": [{"role": "user", "content": "Hello?"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
            {"messages": []},
            {"messages": CONVERSATIONS[3]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "cache"
    _, stdout, _ = dump(chatml_teacher, data, out, "--targets", "top-k", "--top-k", K, capsys=capsys)
    assert "skipped 4 of 6 rows that are not usable conversations" in stdout
    for fragment in ("example 1: no assistant turn", "example 2: turn 1 has unknown role 'bot'",
                     "example 3: turn 1 (assistant) has NoneType content", "example 4: empty conversation"):
        assert fragment in stdout
    assert [r["example_id"] for r in read_rows(out)] == [0, 5]
    assert manifest(out)["chat_summary"]["skipped_rows"] == 4
    error = cli_error(["dump-logits", "--teacher", chatml_teacher, "--data", data, "--out", tmp_path / "strict",
                       "--no-progress", "--strict"])
    assert "--strict: 4 of 6 rows are not usable conversations" in error and "example 1: no assistant turn" in error
    assert not (tmp_path / "strict").exists()


def test_unalignable_conversations_are_reported_and_skipped(tmp_path, capsys, chat_tokenizer, plain_teacher, conversations):
    """A header ending in a space merges with a reply's first word ("assistant: To" -> " To"): no token boundary
    at the reply's start, so those conversations are skipped with a reason; the rest are cached exactly."""
    out = tmp_path / "cache"
    template = template_file(tmp_path, MERGING)
    _, stdout, _ = dump(plain_teacher, conversations, out, "--targets", "top-k", "--top-k", K, "--chat-template", template, capsys=capsys)
    assert "cannot be aligned exactly" in stdout and "falls inside a token" in stdout
    kept = [r["example_id"] for r in read_rows(out)]
    skipped = [i for i in range(len(CONVERSATIONS)) if i not in kept]
    assert kept and skipped and manifest(out)["chat_summary"]["misaligned"] == len(skipped)
    check_alignment(out, chat_tokenizer, CONVERSATIONS, MERGING, "</s>", False, kept=kept)
    for i in skipped:  # independently: some reply of each skipped conversation has no token starting where it starts
        assert f"example {i}: assistant turn" not in stdout and f"example {i}: character" in stdout
        messages = CONVERSATIONS[i]
        text = chat_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=MERGING)
        starts = {a for a, _ in chat_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
        reply_starts = [text.index("assistant: " + m["content"]) + len("assistant: ") for m in messages if m["role"] == "assistant"]
        assert not all(r in starts for r in reply_starts)
    error = cli_error(["dump-logits", "--teacher", plain_teacher, "--data", conversations, "--out", tmp_path / "strict",
                       "--chat-template", template, "--strict", "--no-progress"])
    assert "cannot be aligned exactly" in error


def test_refusals(tmp_path, plain_teacher, chatml_teacher, conversations, shakespeare_txt):
    base = ["dump-logits", "--no-progress", "--out"]
    assert "has no chat template" in cli_error([*base, tmp_path / "a", "--teacher", plain_teacher, "--data", conversations])
    assert "--packing is not offered" in cli_error([*base, tmp_path / "b", "--teacher", chatml_teacher,
                                                    "--data", conversations, "--packing"])
    assert "is for chat corpora" in cli_error([*base, tmp_path / "c", "--teacher", chatml_teacher, "--data", shakespeare_txt,
                                              "--targets-on", "assistant"])
    assert "--messages-column 'chat'" in cli_error([*base, tmp_path / "d", "--teacher", chatml_teacher,
                                                    "--data", conversations, "--messages-column", "chat"])
    # The template is part of the cache's identity: another one is refused in the same --out.
    out = tmp_path / "cache"
    dump(chatml_teacher, conversations, out, "--targets", "top-k", "--top-k", K)
    error = cli_error([*base, out, "--teacher", chatml_teacher, "--data", conversations, "--targets", "top-k", "--top-k", K,
                       "--chat-template", template_file(tmp_path, ZEPHYR)])
    assert "chat.template_sha256" in error


def test_messages_column_with_label_or_pair_column_is_refused(tmp_path, chatml_teacher, conversations):
    # Refused before any output, instead of falling through to reading the conversations as plain text.
    for option in ("--label-column", "--text-pair-column"):
        error = cli_error(["dump-logits", "--no-progress", "--out", tmp_path / "e", "--teacher", chatml_teacher,
                           "--data", conversations, "--messages-column", "messages", option, "label"])
        assert f"--messages-column cannot be combined with {option}" in error
        assert not (tmp_path / "e").exists()


def test_inspect_verify_and_a_student_that_chats(tmp_path, chatml_teacher, conversations):
    out = tmp_path / "cache"
    dump(chatml_teacher, conversations, out, "--targets", "top-k", "--top-k", K)
    stats = json.loads(cli_ok(["inspect", out, "--json"]))
    rows = read_rows(out)
    assert stats["conversations"] == len(CONVERSATIONS)
    assert stats["turns"] == sum(len(c) for c in CONVERSATIONS)
    assert stats["assistant_turns"] == sum(m["role"] == "assistant" for c in CONVERSATIONS for m in c)
    assert stats["assistant_tokens"] == sum(len(r["positions"]) for r in rows)
    assert stats["conversation_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert stats["bytes_per_conversation"] == pytest.approx(manifest(out)["totals"]["bytes"] / len(rows), abs=0.1)
    assert "ok:" in cli_ok(["verify", out])
    student = tmp_path / "student"
    cli_ok(["train-student", "--cache", out, "--student", "L2-H128", "--out", student, "--max-steps", 2,
            "--batch-size", 2, "--no-progress"])
    tokenizer = AutoTokenizer.from_pretrained(student)
    assert tokenizer.chat_template == CHATML_SMOLLM2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# Resume and torchrun: rows are defined by the corpus alone, as for text caches.
RESUME = ["--targets", "top-k", "--top-k", K, "--shard-rows", 4, "--max-tokens-per-batch", 256]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("many") / "many.jsonl", many_conversations(128))


@pytest.fixture(scope="module")
def many_reference(tmp_path_factory, chatml_teacher, many):
    out = tmp_path_factory.mktemp("reference") / "cache"
    dump(chatml_teacher, many, out, *RESUME)
    return out


def test_kill_9_then_resume_is_row_identical(tmp_path, chatml_teacher, many, many_reference):
    out = tmp_path / "cache"
    args = ["dump-logits", "--teacher", chatml_teacher, "--data", many, "--out", out, "--no-progress", *RESUME]
    kill_after_first_shard(args, out)
    assert manifest(out)["complete"] is False
    dump(chatml_teacher, many, out, *RESUME)
    assert manifest(out)["complete"] is True
    assert_same_rows(read_rows(out), read_rows(many_reference))
    assert [s["sha256"] for s in manifest(out)["shards"]] == [s["sha256"] for s in manifest(many_reference)["shards"]]
    assert "ok:" in cli_ok(["verify", out])


def test_torchrun_two_processes_equal_one(tmp_path, chatml_teacher, many, many_reference):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdcache",
           "dump-logits", "--teacher", str(chatml_teacher), "--data", str(many), "--out", str(out), "--no-progress",
           *map(str, RESUME)]
    result = subprocess.run(cmd, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifest(out)["dump"]["world_size"] == 2
    assert_same_rows(read_rows(out), read_rows(many_reference))
    assert manifest(out)["chat_summary"] == manifest(many_reference)["chat_summary"]

