"""How far a student pruned from its teacher starts: held-out perplexity before any training.

Each student is the teacher's own config with fewer layers, filled as `--init-from-teacher` fills it
(embeddings, head and evenly spaced layers: kdcache.train.students.init_from_teacher), then scored by
`kdcache evaluate` on a held-out cache (a chat cache: assistant tokens). It says how much healing a pruned
student needs before distillation can make it answer (README, "Distil your chat model").

    nice python benchmarks/pruned_students.py --teacher .cache/teachers/smollm2-135m-instruct \
        --eval-cache runs/chat-small/eval-cache --layers 2 8 15 20
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.train.students import init_from_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="the teacher's model directory")
    ap.add_argument("--eval-cache", type=Path, required=True, help="a held-out causal-LM cache of that teacher")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15, 20])
    args = ap.parse_args()
    manifest = json.loads((args.eval_cache / "manifest.json").read_text())
    teacher_layers = AutoConfig.from_pretrained(args.teacher).num_hidden_layers
    print(f"| student layers (of {teacher_layers}) | teacher layers kept | held-out perplexity before training |")
    print("|---:|---|---:|")
    for n in args.layers:
        config = AutoConfig.from_pretrained(args.teacher, num_hidden_layers=n)
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_config(config)
        kept = init_from_teacher(student, "clm", manifest, str(args.teacher))
        with tempfile.TemporaryDirectory() as folder:
            student.save_pretrained(folder)
            done = subprocess.run([sys.executable, "-m", "kdcache", "evaluate", "--model", folder,
                                   "--cache", str(args.eval_cache), "--json"], capture_output=True, text=True, check=True)
        print(f"| {n} | {kept} | {json.loads(done.stdout)['perplexity']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
