"""`kdcache report --answers`: the teacher's and each student's greedy replies, side by side.

The teacher is a tiny Llama whose tokenizer (trained on the fly) has ChatML-style special tokens and a
chat template; every reply in answers.json is checked against an independent greedy decode (a full
forward per step, argmax) of that model, from a prompt rendered with the model folder's own tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import _byte_bpe
from kdcache.errors import KdcacheError
from kdcache.sweep import answers
from stage2_helpers import cli_error, cli_ok, run_cli
from sweep_helpers import TRAIN, dump

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = [
    [{"role": "user", "content": "Who is the king of Denmark?"}],
    [{"role": "system", "content": "You answer in verse."},
     {"role": "user", "content": "Speak the speech, I pray you."},
     {"role": "assistant", "content": "As I pronounced it to you."},
     {"role": "user", "content": "Trippingly | on the tongue?"}],
]
MAX_NEW = 10


def chat_teacher(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_bpe(400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.3)  # wide weights: varied argmaxes, not one token repeated
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_sweep(tmp_path_factory, shakespeare_txt):
    root = tmp_path_factory.mktemp("answers")
    teacher = chat_teacher(root / "teacher")
    lines = shakespeare_txt.read_text().splitlines()
    (root / "train.txt").write_text("\n".join(lines[:200]) + "\n")
    (root / "heldout.txt").write_text("\n".join(lines[200:260]) + "\n")
    cache = dump(teacher, root / "train.txt", root / "cache")
    eval_cache = dump(teacher, root / "heldout.txt", root / "eval-cache")
    # The report labels its metrics by what the eval cache's manifest says it holds: mark it a chat cache.
    manifest = json.loads((eval_cache / "manifest.json").read_text())
    manifest["chat"] = {"template_sha256": "test", "targets_on": "assistant", "format": "messages"}
    (eval_cache / "manifest.json").write_text(json.dumps(manifest))
    runs = root / "runs"
    for name, extra in (("L2-H128", []), ("hard", ["--alpha", 0])):
        cli_ok(["train-student", "--cache", cache, "--student", "L2-H128", "--out", runs / name, *TRAIN, *extra])
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in PROMPTS))
    out = cli_ok(["report", runs, "--eval-cache", eval_cache, "--answers", prompts, "--max-new-tokens", MAX_NEW])
    return root, teacher, runs, eval_cache, prompts, out


def independent_greedy(model_dir: Path, messages: list[dict]) -> list[int]:
    """Greedy decoding by hand: the whole sequence forwarded at every step, the argmax appended, until
    an end token or MAX_NEW tokens; the prompt from the model folder's own tokenizer and template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    reply = []
    for _ in range(MAX_NEW):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + reply])).logits[0, -1]
        token = int(logits.argmax())
        if token in stop:
            break
        reply.append(token)
    return reply


def test_each_reply_is_that_models_greedy_decode(chat_sweep):
    from transformers import AutoTokenizer

    _, teacher, runs, _, prompts, printed = chat_sweep
    result = json.loads((runs / answers.ANSWERS_JSON).read_text())
    assert [m["name"] for m in result["models"]] == ["teacher", "L2-H128", "hard"]
    assert result["max_new_tokens"] == MAX_NEW and [p["messages"] for p in result["prompts"]] == PROMPTS
    tok = AutoTokenizer.from_pretrained(teacher)
    md = (runs / "report.md").read_text()
    section = md[md.index("## Side-by-side answers"):]
    texts = set()
    for entry, messages in zip(result["prompts"], PROMPTS):
        for name, model_dir in (("teacher", teacher), ("L2-H128", runs / "L2-H128"), ("hard", runs / "hard")):
            reply = entry["replies"][name]
            want = independent_greedy(model_dir, messages)
            assert reply["tokens"] == want, f"{name} on {messages[-1]['content']!r}"
            assert reply["stopped"] == (len(want) < MAX_NEW)
            assert reply["text"] == tok.decode(want, skip_special_tokens=True).strip()
            cell = "".join(c if c.isprintable() or c == "\n" else " " if c in "\t\r" else "\ufffd" for c in reply["text"])
            cell = cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")
            assert f"| {name} | " in section and cell in section
            texts.add(reply["text"])
    assert len(texts) > 2  # different models really answered differently: a mix-up would show
    assert "Trippingly \\| on the tongue?" in section and "(3 earlier messages not shown)" in section
    assert "prompt 1: Who is the king of Denmark?" in printed
    assert "Chat cache: every metric is assistant-token" in md
    assert "![held-out assistant-token perplexity (lower is better) vs student parameters]" in md


def test_bad_prompt_files_are_one_line_errors(chat_sweep, tmp_path):
    root, _, runs, eval_cache, _, _ = chat_sweep
    before = (runs / "report.md").read_text()
    for content, message in (('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "line 2 is not JSON"),
                             ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "ends with an assistant message"),
                             ('{"messages": [{"role": "narrator", "content": "hi"}]}\n', "message 0 is not {role, content}"),
                             ('{"prompt": "hi"}\n', 'has no "messages" list'),
                             ("\n", "holds no prompts")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        assert message in cli_error(["report", runs, "--eval-cache", eval_cache, "--answers", bad])
    assert "does not exist" in cli_error(["report", runs, "--eval-cache", eval_cache, "--answers", tmp_path / "none.jsonl"])
    (tmp_path / "latin1.jsonl").write_bytes('{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    assert "cannot read it as UTF-8" in cli_error(["report", runs, "--eval-cache", eval_cache, "--answers",
                                                   tmp_path / "latin1.jsonl"])
    assert (runs / "report.md").read_text() == before  # nothing written


def test_a_prompt_beyond_a_models_position_limit_is_refused_before_any_evaluation(chat_sweep, tmp_path):
    from transformers import AutoTokenizer

    _, teacher, runs, eval_cache, _, _ = chat_sweep
    before = (runs / "report.md").read_text()
    long = [{"role": "user", "content": "Speak the speech, I pray you, trippingly on the tongue. " * 30}]
    prompts = tmp_path / "long.jsonl"  # the long prompt on line 3, after a fitting one and a blank line
    prompts.write_text(json.dumps({"messages": PROMPTS[0]}) + "\n\n" + json.dumps({"messages": long}) + "\n")
    tok = AutoTokenizer.from_pretrained(teacher)
    tokens = len(tok(tok.apply_chat_template(long, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"])
    # The tightest limit among the teacher and the students, read here from their config.json files.
    limits = {name: json.loads((folder / "config.json").read_text())["max_position_embeddings"]
              for name, folder in (("teacher", teacher), ("L2-H128", runs / "L2-H128"), ("hard", runs / "hard"))}
    name = min(limits, key=limits.get)
    assert tokens > limits[name] - MAX_NEW  # the prompt really is too long
    code, out, err = run_cli(["report", runs, "--eval-cache", eval_cache, "--answers", prompts, "--max-new-tokens", MAX_NEW])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert (f"--answers {prompts} line 3: the prompt is {tokens} tokens, more than the {limits[name] - MAX_NEW} {name} "
            f"can take ({limits[name]} positions minus --max-new-tokens {MAX_NEW})") in errors[0]
    assert "[report] evaluating" not in out + err  # refused before the slow evaluations
    assert (runs / "report.md").read_text() == before  # nothing written
    # --max-new-tokens alone can leave no room at all.
    assert "leaves no room for a prompt" in cli_error(["report", runs, "--eval-cache", eval_cache, "--answers", prompts,
                                                       "--max-new-tokens", limits[name]])


def test_a_loaded_models_own_limit_is_checked_too(chat_sweep, tmp_path):
    # A .gguf teacher has no config.json to read beforehand: its loaded config is checked before generating.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher, _, _, _, _ = chat_sweep
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    model.config.max_position_embeddings = 20
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": PROMPTS[0]}) + "\n")
    prompts = answers.read_prompts(tmp_path / "p.jsonl")
    tokens = len(answers.render(tok, PROMPTS[0]))
    assert tokens > 20 - MAX_NEW
    with pytest.raises(KdcacheError, match=f"line 1: the prompt is {tokens} tokens, more than the {20 - MAX_NEW} gguf "):
        answers.side_by_side(prompts, [answers.Answerer("gguf", "teacher", lambda: model)], tok, max_new_tokens=MAX_NEW)


def test_a_tokenizer_without_chat_template_is_refused(tiny_llama_clm):
    with pytest.raises(KdcacheError, match="needs a chat template"):
        answers.chat_tokenizer(tiny_llama_clm)


def test_greedy_reply_stops_at_a_stop_token_and_leaves_it_out(chat_sweep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher, _, _, _, _ = chat_sweep
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    prompt = answers.render(tok, PROMPTS[0])
    free, _ = answers.greedy_reply(model, prompt, max_new_tokens=8, stop=[], pad_id=tok.pad_token_id)
    assert len(free) == 8
    # Declare the 4th token a stop token: the reply is the three before it, marked as stopped.
    cut, stopped = answers.greedy_reply(model, prompt, max_new_tokens=8, stop=[free[3]], pad_id=tok.pad_token_id)
    assert stopped and cut == free[:free.index(free[3])]


def test_a_teacher_that_cannot_be_loaded_is_noted_and_the_students_still_answer(chat_sweep, tmp_path):
    import shutil

    _, _, runs, eval_cache, prompts, _ = chat_sweep
    moved = shutil.copytree(eval_cache, tmp_path / "eval-cache")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["teacher"]["source"] = str(tmp_path / "gone")  # the teacher folder was moved away since the dump
    (moved / "manifest.json").write_text(json.dumps(manifest))
    cli_ok(["report", runs, "--eval-cache", moved, "--answers", prompts, "--max-new-tokens", 3])
    result = json.loads((runs / answers.ANSWERS_JSON).read_text())
    assert [m["name"] for m in result["models"]] == ["L2-H128", "hard"]
    assert len(result["notes"]) == 1 and result["notes"][0].startswith("teacher gave no answers: ")
    assert all(set(p["replies"]) == {"L2-H128", "hard"} for p in result["prompts"])
    assert "teacher gave no answers" in (runs / "report.md").read_text()
