"""The report's side-by-side answers: the teacher's and each student's greedy reply to a few held-out
prompts, so a user sees what distillation bought.

Every model gets the same prompt tokens: the conversation rendered with the chat template of the eval
cache's tokenizer (the teacher's, which `train-student` ships with every student) plus the assistant's
generation prompt. Replies are greedy (no sampling, no repetition penalty: the model's own argmax) and
bounded by --max-new-tokens; one model is in memory at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..dump.chat import ROLES  # the roles a chat corpus may use: the same for prompts
from ..errors import KdcacheError

ANSWERS_JSON = "answers.json"
# End-of-turn markers of common chat templates: generation stops at these as well as at the
# tokenizer's and the model's eos, since some tokenizers' eos is not the end of an assistant turn.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Prompts(list):
    """read_prompts' conversations; `lines` holds each one's line number in the file, for errors."""
    lines: list[int]
    source: str


def read_prompts(path: Path) -> Prompts:
    """PROMPTS.jsonl: one {"messages": [{role, content}, ...]} per line, ending before the reply wanted."""
    path = Path(path)
    if not path.is_file():
        raise KdcacheError(f"--answers {path} does not exist; pass a .jsonl file with one "
                           '{"messages": [{"role": "user", "content": "..."}]} per line')
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdcacheError(f"--answers {path}: cannot read it as UTF-8 text ({type(e).__name__}); pass a .jsonl file "
                           "with one JSON object per line") from None
    prompts = Prompts()
    prompts.lines, prompts.source = [], str(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--answers {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KdcacheError(f"{where} is not JSON ({e.msg}); write one JSON object per line") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise KdcacheError(f'{where} has no "messages" list; write {{"messages": [{{"role": "user", "content": "..."}}]}}')
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise KdcacheError(f"{where}: message {i} is not {{role, content}} with role one of {', '.join(ROLES)} "
                                   "and string content")
        if messages[-1]["role"] == "assistant":
            raise KdcacheError(f"{where} ends with an assistant message; end the conversation at the turn to be answered")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
        prompts.lines.append(number)
    if not prompts:
        raise KdcacheError(f"--answers {path} holds no prompts; write one JSON object per line")
    return prompts


def chat_tokenizer(tokenizer_dir: Path):
    """The eval cache's tokenizer, which must carry a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise KdcacheError(f"--answers needs a chat template, and the eval cache's tokenizer ({tokenizer_dir}) has none; "
                           "use a cache dumped from a chat teacher (or with --chat-template), or leave out --answers")
    return tokenizer


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the template's text encoded as is (templates write their own BOS)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template error (jinja, raise_exception) is the user's input
        raise KdcacheError(f"the chat template cannot render an --answers prompt ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0]}); check the prompt's roles against the template") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def position_limit(model_dir) -> int | None:
    """The longest sequence a model folder's config.json allows (None: it states none, or there is no
    readable config.json, as for a .gguf teacher; the loaded model's config is checked then)."""
    from transformers import AutoConfig

    from ..dump.teacher import max_positions

    if not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        return max_positions(AutoConfig.from_pretrained(model_dir))
    except Exception:  # noqa: BLE001 - unreadable here (e.g. remote code): checked again once loaded
        return None


def check_lengths(prompts: list[list[dict]], rendered: list[list[int]], limits: dict[str, int | None], *,
                  max_new_tokens: int) -> None:
    """Every prompt plus its reply must fit every model's position limit: past it `generate` fails
    deep inside the model (or silently degrades), so refuse with the prompt's line and the numbers."""
    known = {name: limit for name, limit in limits.items() if limit is not None}
    if not known:
        return
    name = min(known, key=known.get)  # the tightest model decides
    limit = known[name]
    room = limit - max_new_tokens
    if room < 1:
        raise KdcacheError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {name}'s limit of {limit} "
                           f"positions; pass --max-new-tokens {max(limit // 2, 1)} or less")
    lines = getattr(prompts, "lines", None) or list(range(1, len(prompts) + 1))
    where = f"--answers {getattr(prompts, 'source', 'PROMPTS.jsonl')}"
    for line, ids in zip(lines, rendered):
        if len(ids) > room:
            raise KdcacheError(f"{where} line {line}: the prompt is {len(ids)} tokens, more than the {room} {name} can "
                               f"take ({limit} positions minus --max-new-tokens {max_new_tokens}); shorten that prompt "
                               "or lower --max-new-tokens")


def stop_ids(tokenizer, model) -> list[int]:
    """Token ids that end a reply: eos of the tokenizer and of the model, and end-of-turn markers."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(i for i in ids if i < model.config.vocab_size)


def greedy_reply(model, prompt: list[int], *, max_new_tokens: int, stop: list[int], pad_id: int | None) -> tuple[list[int], bool]:
    """(reply token ids without the stop token, whether it stopped before max_new_tokens)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    # A fresh config: the model's own (temperature, top_p, repetition_penalty) must not change the argmax.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=stop or None, pad_token_id=pad_id if pad_id is not None else (stop or [0])[0])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, len(prompt):].tolist()
    for i, token in enumerate(new):
        if token in stop:
            return new[:i], True
    return new, False


@dataclass
class Answerer:
    """One model to ask: its name and mode in the report, and how to load it (called once)."""
    name: str
    mode: str
    load: object            # () -> model
    optional: bool = False  # when it cannot be loaded, say so in the report instead of failing


def side_by_side(prompts: list[list[dict]], answerers: list[Answerer], tokenizer, *, max_new_tokens: int,
                 notes: list[str] | None = None, echo=None) -> dict:
    """Every answerer's greedy reply to every prompt; the JSON written next to the report."""
    import gc

    rendered = [render(tokenizer, messages) for messages in prompts]
    result = {"max_new_tokens": max_new_tokens, "notes": list(notes or []),
              "models": [{"name": a.name, "mode": a.mode} for a in answerers],
              "prompts": [{"messages": messages, "prompt_tokens": len(ids), "replies": {}}
                          for messages, ids in zip(prompts, rendered)]}
    pad_id = tokenizer.pad_token_id
    for answerer in answerers:
        if echo:
            echo(f"[report] answering {len(prompts)} prompt(s) with {answerer.name}")
        try:
            model = answerer.load()
        except KdcacheError as e:
            if not answerer.optional:
                raise
            result["notes"].append(f"{answerer.name} gave no answers: {e}")
            result["models"] = [m for m in result["models"] if m["name"] != answerer.name]
            continue
        # Again with the loaded model's own limit: a .gguf teacher has no config.json to check beforehand.
        from ..dump.teacher import max_positions
        check_lengths(prompts, rendered, {answerer.name: max_positions(model.config)}, max_new_tokens=max_new_tokens)
        stop = stop_ids(tokenizer, model)
        for entry, ids in zip(result["prompts"], rendered):
            reply, stopped = greedy_reply(model, ids, max_new_tokens=max_new_tokens, stop=stop, pad_id=pad_id)
            entry["replies"][answerer.name] = {"text": tokenizer.decode(reply, skip_special_tokens=True).strip(),
                                               "tokens": reply, "stopped": stopped}
        del model
        gc.collect()
    return result


def _cell(text: str) -> str:
    """A reply inside a Markdown table cell: one line, pipes escaped, control characters (which a
    weak student may well emit) shown as U+FFFD."""
    text = "".join(c if c.isprintable() or c == "\n" else " " if c in "\t\r" else "\ufffd" for c in text)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def markdown(result: dict, answers_file: str) -> list[str]:
    """The report's section: per prompt, the last user turn and a table of replies."""
    modes = {m["name"]: m["mode"] for m in result["models"]}
    lines = ["## Side-by-side answers", "",
             f"Greedy replies, at most {result['max_new_tokens']} new tokens (… marks a reply cut there), to the prompts "
             f"in `{answers_file}`, each rendered with the cache's chat template; all of them in `{ANSWERS_JSON}`."]
    for note in result.get("notes") or []:
        lines += ["", f"> {note}"]
    for number, entry in enumerate(result["prompts"], start=1):
        messages = entry["messages"]
        earlier = len(messages) - 1
        lines += ["", f"**Prompt {number}**" + (f" ({earlier} earlier message{'s' * (earlier != 1)} not shown)" if earlier else "")
                  + f": {_cell(messages[-1]['content'])}", "", "| model | mode | reply |", "|---|---|---|"]
        for name, reply in entry["replies"].items():
            lines.append(f"| {name} | {modes.get(name, '')} | {_cell(reply['text'])}{'' if reply['stopped'] else ' …'} |")
    return lines


def echo_lines(result: dict, width: int = 160) -> list[str]:
    """A short printed version: one line per reply."""
    lines = []
    for number, entry in enumerate(result["prompts"], start=1):
        lines.append(f"prompt {number}: {entry['messages'][-1]['content'][:width]}")
        for name, reply in entry["replies"].items():
            text = " ".join(reply["text"].split())
            lines.append(f"  {name:>14}: {text[:width]}{'' if reply['stopped'] and len(text) <= width else ' …'}")
    return lines
