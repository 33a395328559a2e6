"""Rendering a conversation with the teacher's chat template and finding its assistant tokens exactly.

A target position is one whose NEXT token belongs to an assistant message's content or to its
end-of-turn marker: never a role header, never a user/system/tool token. Templates add text around
the content (headers, a default system prompt, trimming) and BPE may merge across a boundary, so the
spans are found in two independent steps, and a conversation where either fails is reported, never guessed:

1. Characters. For assistant message i the template renders messages[:i] + [a sentinel message]: the
   text before the sentinel is everything up to the content (headers, system prompt, earlier turns),
   the text after it is what closes the turn. The real rendering of messages[:i+1] must be that header,
   the content (as given, or trimmed when the template trims), that closer; and the whole
   conversation's rendering must begin with it. The end-of-turn marker is the closer up to its first
   special token (ChatML "<|im_end|>", Llama-3 "<|eot_id|>", Zephyr "</s>"): the token the model
   must learn to stop on. A newline after it is the next turn's business, not a target.
2. Tokens. Each span boundary b (content start, end-of-turn end) must be a token boundary: the
   tokenization of text[:b] must be a prefix of the whole text's tokenization. Then tokens n_a..n_b
   decode to exactly that span, whatever the tokenizer does inside it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.files import json_sha256
from ..errors import KdcacheError
from .chat import CONVERSATION, report_problems
from .corpus import SOURCE_INDEX
from .rows import INPUT_IDS, LENGTH, TARGET_POSITIONS
from .teacher import tokenizer_fingerprint

ASSISTANT, ALL, LAST_ASSISTANT = "assistant", "all", "last-assistant"
TARGETS_ON = (ASSISTANT, ALL, LAST_ASSISTANT)
# Stands in for an assistant message's content to see where the template puts it.
SENTINEL = "\u2063kdcache-assistant-content-7f3a9c\u2063"
NOT_TRUNCATED, AT_TURN, MID_TURN = "", "turn", "mid-turn"


class Misaligned(Exception):
    """A conversation whose assistant spans cannot be found exactly (reported and skipped)."""


@dataclass
class ChatTemplate:
    text: str
    source: str   # "teacher" or the --chat-template file

    @property
    def sha256(self) -> str:
        return json_sha256({"chat_template": self.text})


def resolve_template(tokenizer, template_file: str | None) -> ChatTemplate:
    """The template conversations are rendered with: --chat-template FILE, else the teacher tokenizer's
    own (a GGUF teacher carries one). Set on the tokenizer, so the cache's tokenizer (and every
    student trained from the cache, which copies it) chats with apply_chat_template like the teacher."""
    if template_file:
        path = Path(template_file).expanduser()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise KdcacheError(f"--chat-template {template_file}: cannot read it ({type(e).__name__}: "
                               f"{getattr(e, 'strerror', None) or e}); pass a Jinja chat template file") from None
        if not text.strip():
            raise KdcacheError(f"--chat-template {template_file} is empty; pass a Jinja chat template file")
        source = str(path.resolve())
    else:
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one renders conversations
            text = text.get("default")
        if not text:
            raise KdcacheError("the teacher's tokenizer has no chat template, so conversations cannot be rendered as it "
                               "was trained on them; pass --chat-template FILE (a Jinja template, e.g. its model card's)")
        source = "teacher"
    tokenizer.chat_template = text
    return ChatTemplate(text, source)


def special_tokens(tokenizer) -> list[str]:
    """Special token strings (end-of-turn candidates), longest first so "<|im_end|>" wins over "<"."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


@dataclass
class ChatRow:
    input_ids: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    turns: int = 0
    assistant_turns: int = 0      # assistant turns with targets in the row
    truncated: str = NOT_TRUNCATED
    end_of_turn: str = ""
    problem: str = ""


class ChatEncoder:
    """One conversation -> the teacher's input ids and its target positions (see module docstring)."""

    def __init__(self, tokenizer, template: ChatTemplate, *, max_length: int, targets_on: str = ASSISTANT):
        self.tokenizer, self.template, self.max_length, self.targets_on = tokenizer, template, max_length, targets_on
        self.specials = special_tokens(tokenizer)
        self.tokenizer_sha256 = tokenizer_fingerprint(tokenizer)  # the vocabulary and special tokens, hashed

    def render(self, messages: list[dict]) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template.text)

    def end_of_turn(self, closer: str) -> str:
        """The closer up to the end of its first special token ("" when it has none)."""
        hits = [(closer.find(t), -len(t), t) for t in self.specials if t in closer]
        if not hits:
            return ""
        start, _, token = min(hits)
        return closer[:start + len(token)]

    def char_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int, int, str]]]:
        """(rendered text, [(message index, content start, end-of-turn end, end-of-turn text)])."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            probe = self.render(messages[:i] + [{"role": "assistant", "content": SENTINEL}])
            if probe.count(SENTINEL) != 1:
                raise Misaligned(f"assistant turn {i}: the template does not render its content exactly once")
            header, closer = probe.split(SENTINEL)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(header) and upto.endswith(closer) and len(upto) >= len(header) + len(closer)):
                raise Misaligned(f"assistant turn {i}: the template renders the text around it differently "
                                 "depending on its content")
            start, stop = len(header), len(upto) - len(closer)
            rendered, content = upto[start:stop], message["content"]
            if rendered not in (content, content.strip()):
                raise Misaligned(f"assistant turn {i}: the template changes its content (beyond trimming)")
            if not full.startswith(upto):
                raise Misaligned(f"assistant turn {i}: the template renders it differently when later turns follow")
            eot = self.end_of_turn(closer)
            spans.append((i, start, stop + len(eot), eot))
        return full, spans

    def token_boundaries(self, text: str, offsets: list[int]) -> tuple[list[int], dict[int, int]]:
        """(token ids of text, {char offset: token index}) or Misaligned when an offset splits a token."""
        unique = sorted(set(offsets))
        encoded = self.tokenizer([text] + [text[:b] for b in unique], add_special_tokens=False)["input_ids"]
        ids, where = list(encoded[0]), {}
        for b, prefix in zip(unique, encoded[1:]):
            if list(prefix) != ids[:len(prefix)]:
                raise Misaligned(f"character {b} of the rendered conversation ({text[max(0, b - 12):b]!r}|"
                                 f"{text[b:b + 12]!r}) falls inside a token: the tokenizer merges across the "
                                 "assistant span's edge")
            where[b] = len(prefix)
        return ids, where

    def __call__(self, messages: list[dict]) -> ChatRow:
        row = ChatRow(turns=len(messages))
        try:
            full, spans = self.char_spans(messages)
            ids, where = self.token_boundaries(full, [b for _, a, e, _ in spans for b in (a, e)])
        except Misaligned as e:
            row.problem = str(e)
            return row
        except Exception as e:  # noqa: BLE001 - a template may raise on a conversation it does not accept
            row.problem = f"the chat template refuses it ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
            return row
        turns = [(where[a], where[e]) for _, a, e, _ in spans]  # token ranges [s, e) of content + end of turn
        row.end_of_turn = spans[0][3]
        if self.targets_on == LAST_ASSISTANT:
            turns = turns[-1:]
        # Tokens after the last target turn teach nothing (a causal teacher never looks ahead): dropped,
        # except for `all`, which caches every position.
        cut = len(ids) if self.targets_on == ALL else turns[-1][1]
        if cut > self.max_length:
            fitting = [e for _, e in turns if e <= self.max_length]
            if fitting and self.targets_on != LAST_ASSISTANT:
                cut, row.truncated = max(fitting), AT_TURN
            else:
                cut, row.truncated = self.max_length, MID_TURN
        if self.targets_on == ALL:
            positions = list(range(cut - 1))
            row.assistant_turns = sum(1 for s, _ in turns if s < cut)
        else:
            positions = []
            for s, e in turns:
                stop = min(e, cut)
                if s < stop:
                    positions.extend(range(max(s, 1) - 1, stop - 1))  # p targets token p + 1
                    row.assistant_turns += 1
        if not positions:
            row.problem = (f"its {'last ' if self.targets_on == LAST_ASSISTANT else 'first '}assistant turn starts at token "
                           f"{turns[0 if self.targets_on != LAST_ASSISTANT else -1][0]}, beyond --max-length {self.max_length}")
            return row
        row.input_ids, row.positions = ids[:cut], positions
        return row


# Per-conversation columns of the encoded dataset, besides input_ids/length/target_positions/source_index.
TURNS, ASSISTANT_TURNS, TRUNCATED, END_OF_TURN, PROBLEM = "turns", "assistant_turns", "truncated", "end_of_turn", "problem"


def encode_dataset(corpus, encoder: ChatEncoder):
    """datasets.map the encoder over the conversations (cached by datasets for file-backed corpora)."""
    def encode(batch):
        rows = [encoder(json.loads(text)) for text in batch[CONVERSATION]]
        return {INPUT_IDS: [r.input_ids for r in rows], LENGTH: [len(r.input_ids) for r in rows],
                TARGET_POSITIONS: [r.positions for r in rows], TURNS: [r.turns for r in rows],
                ASSISTANT_TURNS: [r.assistant_turns for r in rows], TRUNCATED: [r.truncated for r in rows],
                END_OF_TURN: [r.end_of_turn for r in rows], PROBLEM: [r.problem for r in rows]}

    drop = [c for c in corpus.dataset.column_names if c != SOURCE_INDEX]
    # datasets keys its map cache on a hash of `encode`, which does not see this module's code: name the
    # result by everything that decides it instead, so an upgraded kdcache never reuses an older alignment.
    fingerprint = json_sha256({"data": corpus.dataset._fingerprint, "code": Path(__file__).read_text(),
                               "template": encoder.template.sha256, "max_length": encoder.max_length,
                               "targets_on": encoder.targets_on, "tokenizer": encoder.tokenizer_sha256})[:32]
    return corpus.dataset.map(encode, batched=True, batch_size=100, remove_columns=drop, desc="rendering conversations",
                              new_fingerprint=fingerprint)


def split_encoded(encoded) -> tuple[object, list[tuple[int, str]], dict]:
    """(the aligned conversations, [(example index, problem)] of the skipped ones, summary counts)."""
    meta = encoded.select_columns([SOURCE_INDEX, PROBLEM, TURNS, ASSISTANT_TURNS, TRUNCATED, END_OF_TURN, LENGTH])[:]
    ok = [not p for p in meta[PROBLEM]]
    skipped = [(i, p) for i, p in zip(meta[SOURCE_INDEX], meta[PROBLEM]) if p]
    kept = lambda column: [v for v, good in zip(meta[column], ok) if good]  # noqa: E731
    truncated = Counter(kept(TRUNCATED))
    markers = Counter(kept(END_OF_TURN))
    summary = {"conversations": sum(ok), "turns": sum(kept(TURNS)), "assistant_turns": sum(kept(ASSISTANT_TURNS)),
               "tokens": sum(kept(LENGTH)),  # what the teacher reads: every token of the (truncated) conversations
               "truncated_at_turn": truncated[AT_TURN], "truncated_mid_turn": truncated[MID_TURN],
               "end_of_turn": markers.most_common(1)[0][0] if markers else "", "misaligned": len(skipped)}
    good = encoded.filter(lambda batch: [not p for p in batch[PROBLEM]], batched=True)
    return good.remove_columns([PROBLEM, TURNS, ASSISTANT_TURNS, TRUNCATED, END_OF_TURN]), skipped, summary


def tokenize_chat(corpus, tokenizer, *, max_length: int, strict: bool, echo):
    """The aligned conversations, tokenized, for RowPlan; misaligned ones reported (or refused under
    --strict); the counts for the manifest and the summary go to corpus.chat["summary"]."""
    encoder = ChatEncoder(tokenizer, corpus.chat["template"], max_length=max_length, targets_on=corpus.chat["targets_on"])
    good, skipped, summary = split_encoded(encode_dataset(corpus, encoder))
    report_problems(skipped, len(corpus.dataset), "cannot be aligned exactly with the chat template", strict=strict, echo=echo)
    if summary["conversations"] == 0:
        raise KdcacheError("no conversation could be aligned with the chat template (see above); check the template "
                           "(--chat-template) and the tokenizer")
    corpus.chat["summary"] = dict(summary, skipped_rows=len(corpus.bad_rows), template_source=corpus.chat["template"].source)
    return good


def manifest_record(chat: dict | None) -> dict | None:
    """manifest["chat"]: what decides the cache's content (part of its identity)."""
    if chat is None:
        return None
    return {"layout": chat["layout"], "columns": chat["columns"], "targets_on": chat["targets_on"],
            "template_sha256": chat["template"].sha256,
            # The template itself travels in the cache's tokenizer (tokenizer_config / chat_template.jinja).
            "template_in": "tokenizer"}


def summary_line(manifest: dict) -> str:
    """One line on the conversations of a chat dump (empty for other caches)."""
    chat, counts = manifest.get("chat"), manifest.get("chat_summary")
    if not chat or not counts:
        return ""
    eot = counts.get("end_of_turn") or "none found"
    totals = manifest.get("totals") or {}
    per_conversation = f", {totals['bytes'] / totals['rows']:,.0f} bytes per conversation" if totals.get("rows") else ""
    return (f"Chat: {counts['conversations']:,} conversations, {counts['turns']:,} turns, {counts['assistant_turns']:,} "
            f"assistant turns with targets (--targets-on {chat['targets_on']}, end of turn {eot!r}{per_conversation}); truncated to "
            f"--max-length {manifest['max_length']}: {counts['truncated_at_turn']:,} at a turn boundary, "
            f"{counts['truncated_mid_turn']:,} inside a turn; skipped: {counts['skipped_rows']:,} bad rows, "
            f"{counts['misaligned']:,} not alignable.")
