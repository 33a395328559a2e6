"""Pipeline 2: the DistilBERT recipe from a cache — a BERT teacher -> MLM cache with mask copies -> students.

    python3 pipelines/masked_lm.py --small   # a few minutes on 2 CPU cores
    python3 pipelines/masked_lm.py           # full run, meant for a GPU

The teacher, honestly: no pretrained BERT masked-LM head is available offline, so the teacher is the
pretrained all-MiniLM-L6-v2 encoder (6 layers, hidden 384, from its PyPI wheel) with an MLM head trained
briefly by this pipeline on Tiny Shakespeare (--small: the head only, encoder frozen, a few dozen steps;
full: head and encoder). It is a real pretrained encoder but a weak masked-LM teacher; the pipeline prints
its held-out masked-token accuracy before and after the head training.

Then: dump its top-64 predictions at BERT-masked positions (static masking, several differently-masked
copies of every sequence) on the train part and on a held-out part; train a half-depth student of the
teacher's own shape (3 layers, hidden 384) initialised DistilBERT-style from the teacher's embeddings and
every other layer (--init-from-teacher) and the same student from scratch, plus a smaller L2-H128 student;
report held-out masked-token perplexity, accuracy and agreement with the teacher.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pipeline, parse_args, shakespeare_split, show_report, teacher_shaped_config  # noqa: E402
from teachers import minilm_encoder, mlm_teacher  # noqa: E402

SMALL = dict(train_chars=60_000, heldout_chars=16_000, head_steps=30, train_encoder=False, max_length=64,
             mask_copies=2, steps=60, batch=16)
FULL = dict(train_chars=None, heldout_chars=100_000, head_steps=3000, train_encoder=True, max_length=128,
            mask_copies=5, steps=3000, batch=64)


def main():
    args = parse_args("masked_lm", __doc__.splitlines()[0])
    size = SMALL if args.small else FULL
    p = Pipeline("masked_lm", args.out)
    out = args.out

    with p.step("data: Tiny Shakespeare, train part and held-out tail"):
        train_txt, heldout_txt = shakespeare_split(out, size["train_chars"], size["heldout_chars"])
    with p.step("teacher: all-MiniLM-L6-v2 encoder + an MLM head trained here (see the docstring: a stand-in)"):
        teacher = mlm_teacher(minilm_encoder(), train_txt.read_text().splitlines(), heldout_txt.read_text().splitlines(),
                              out / "teacher", steps=size["head_steps"], train_encoder=size["train_encoder"],
                              max_length=size["max_length"])
        print(f"teacher: {teacher} ({json.loads((teacher / '.done.json').read_text())})")

    dump = ["--teacher", teacher, "--task", "mlm", "--max-length", size["max_length"], "--targets", "top-k", "--top-k", 64,
            "--batch-size", 32, "--seed", 0]
    with p.step(f"stage one: MLM cache, {size['mask_copies']} masked copies of every sequence"):
        p.dump_logits(out / "cache", *dump, "--mask-copies", size["mask_copies"], "--data", train_txt)
    with p.step("stage one: held-out MLM cache"):
        p.dump_logits(out / "eval-cache", *dump, "--mask-copies", 1, "--data", heldout_txt)

    runs = out / "runs"
    # DistilBERT's student shape: the teacher with half its layers.
    depth = json.loads((teacher / "config.json").read_text())["num_hidden_layers"] // 2
    half = teacher_shaped_config(teacher, depth, out / "students" / "half-depth" / "config.json")
    # No --lr: the sweep's width rule gives each size its rate (L2-H128 1e-3, H384 3.3e-4; benchmarks/sweep.md).
    train = ["--max-steps", size["steps"], "--batch-size", size["batch"], "--seed", 0]
    with p.step("stage two: half-depth student initialised from the teacher (DistilBERT)"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"L3-H384-init={half}", "--out", runs,
                  *train, "--init-from-teacher")
    with p.step("stage two: the same student from scratch, and a smaller L2-H128"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"L3-H384-scratch={half},L2-H128", "--out", runs, *train)
    with p.step("report: held-out masked-token metrics vs the teacher"):
        p.kdcache("report", runs, "--eval-cache", out / "eval-cache")
    show_report(runs)
    p.finish()


if __name__ == "__main__":
    main()
