"""Chat corpora: which layout a dataset uses, and each row as a list of {role, content} messages.

Three layouts are read (the first that fits, in this order):
  messages   a column of [{role, content}, ...] (HF/OpenAI; roles system/user/assistant/tool),
             `--messages-column NAME` for another column name;
  sharegpt   a `conversations` column of [{from, value}, ...] (from: system/human/gpt);
  alpaca     `instruction` [+ `input`] + `output` (or `response`) columns: one user turn, one reply.
A row that cannot be a conversation (empty, unknown role, non-string content, no assistant turn) is
not guessed at: it gets a one-line problem, and the dump reports (or with --strict refuses) it.
"""
from __future__ import annotations

import json

from ..errors import KdcacheError

MESSAGES, SHAREGPT, ALPACA = "messages", "sharegpt", "alpaca"
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> roles. `user`/`assistant` appear in some ShareGPT exports too.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}
ALPACA_OUTPUTS = ("output", "response")
# Column of the normalised conversation (JSON text: one Arrow type whatever the source's layout).
CONVERSATION, PROBLEM = "conversation", "problem"


def detect(columns: list[str], messages_column: str | None) -> tuple[str, list[str]] | None:
    """(layout, the source columns it reads), or None when the data holds no chat layout."""
    if messages_column:
        return (MESSAGES, [messages_column]) if messages_column in columns else None
    if "messages" in columns:
        return MESSAGES, ["messages"]
    if "conversations" in columns:
        return SHAREGPT, ["conversations"]
    if "instruction" in columns:
        output = next((c for c in ALPACA_OUTPUTS if c in columns), None)
        if output:
            return ALPACA, ["instruction", *(["input"] if "input" in columns else []), output]
    return None


def describe(layout: str, columns: list[str]) -> str:
    """The one line saying what was detected."""
    if layout == MESSAGES:
        return f"chat corpus: column {columns[0]!r} holds {{role, content}} messages"
    if layout == SHAREGPT:
        return "chat corpus: ShareGPT layout (column 'conversations' of {from, value}; human -> user, gpt -> assistant)"
    return (f"chat corpus: instruction/{'input/' if 'input' in columns else ''}{columns[-1]} layout (Alpaca): "
            f"one user turn (instruction{' + input' if 'input' in columns else ''}) and one assistant reply ({columns[-1]})")


def _messages(turns, role_key: str, content_key: str, roles: dict) -> tuple[list[dict] | None, str | None]:
    if turns is None or (isinstance(turns, (list, tuple)) and not turns):
        return None, "empty conversation"
    if not isinstance(turns, (list, tuple)):
        return None, f"the conversation is a {type(turns).__name__}, not a list of turns"
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, f"turn {j} is a {type(turn).__name__}, not a {{{role_key}, {content_key}}} object"
        role = turn.get(role_key)
        if role not in roles:
            return None, f"turn {j} has unknown {role_key} {role!r} (known: {', '.join(sorted(roles))})"
        content = turn.get(content_key)
        if not isinstance(content, str):
            return None, f"turn {j} ({roles[role]}) has {type(content).__name__} content, not a string"
        out.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant turn"
    return out, None


def normalise(layout: str, columns: list[str], row: dict) -> tuple[list[dict] | None, str | None]:
    """(messages, None) or (None, what is wrong with the row)."""
    if layout == MESSAGES:
        return _messages(row[columns[0]], "role", "content", {r: r for r in ROLES})
    if layout == SHAREGPT:
        return _messages(row[columns[0]], "from", "value", SHAREGPT_ROLES)
    instruction, reply = row[columns[0]], row[columns[-1]]
    extra = row.get("input") if "input" in columns else None
    for name, value in (("instruction", instruction), (columns[-1], reply)):
        if not isinstance(value, str):
            return None, f"{name} is {type(value).__name__}, not a string"
    if extra is not None and not isinstance(extra, str):
        return None, f"input is {type(extra).__name__}, not a string"
    if not instruction.strip() and not (extra or "").strip():
        return None, "empty conversation (no instruction)"
    user = instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], None


def normalise_dataset(ds, layout: str, columns: list[str]):
    """The dataset with CONVERSATION (JSON list of messages, "" when bad) and PROBLEM ("" when fine)."""
    def convert(batch):
        n = len(batch[columns[0]])
        conversations, problems = [], []
        for i in range(n):
            messages, problem = normalise(layout, columns, {c: batch[c][i] for c in columns})
            conversations.append(json.dumps(messages, ensure_ascii=False) if messages is not None else "")
            problems.append(problem or "")
        return {CONVERSATION: conversations, PROBLEM: problems}

    return ds.map(convert, batched=True, batch_size=1000, desc="reading conversations")


def report_problems(problems: list[tuple[int, str]], total: int, what: str, *, strict: bool, echo,
                    noun: str = "conversations") -> None:
    """Say which examples are skipped and why (or refuse them under --strict): never silent."""
    if not problems:
        return
    shown = "; ".join(f"example {i}: {p}" for i, p in problems[:10])
    more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    if strict:
        raise KdcacheError(f"--strict: {len(problems)} of {total} {noun} {what} ({shown}{more}); fix those rows "
                           "in --data, or drop --strict to skip them with a report")
    echo(f"skipped {len(problems)} of {total} {noun} that {what} ({shown}{more}); --strict refuses them instead")
