"""Step time of the transformers Trainer integration (KDTrainer) ÷ `kdcache train-student`'s, same
student directory, same cache, same settings (so the same batches: the per-step losses are checked
equal), side by side in one run, alternating.

Step time = time between consecutive optimizer-step ends, loader included, taken at the same point
in both: after train-student's optimizer step (its kdcache.train.loop._optimizer_step, wrapped here)
and at KDTrainer's on_step_end. Two clocks: wall time, and the training process's CPU time (the
loader workers are other processes), which the other jobs on a shared machine disturb far less.
The first --skip steps (start-up, worker spawn) are dropped; median over steps and repeats.
Goal: ratio <= 1.05.

    python benchmarks/trainer_step.py [--steps 60] [--repeats 2] [--hidden 128] [--vocab 8000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_common import command_line, dump, make_teacher


def student_dir(teacher: Path, out: Path, layers: int) -> Path:
    from transformers import LlamaForCausalLM

    if not (out / "config.json").is_file():
        config = LlamaForCausalLM.from_pretrained(teacher).config
        config.num_hidden_layers = layers
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def per_step(ends: list[tuple[float, float]], skip: int) -> tuple[list[float], list[float]]:
    """(wall, cpu) seconds of each step after the first `skip`."""
    ends = ends[skip:]
    return ([b[0] - a[0] for a, b in zip(ends, ends[1:])], [b[1] - a[1] for a, b in zip(ends, ends[1:])])


def train_student(cache: Path, student: Path, out: Path, a):
    """((wall, cpu) seconds per step, losses) of train-student."""
    from kdcache.train import loop

    ends = []
    original = loop._optimizer_step

    def timed(*args, **kwargs):
        original(*args, **kwargs)
        ends.append(clocks())

    shutil.rmtree(out, ignore_errors=True)
    loop._optimizer_step = timed
    try:
        loop.train(loop.TrainConfig(cache=cache, student=str(student), out=out, max_steps=a.steps,
                                    batch_size=a.batch_size, lr=1e-3, seed=0, num_workers=2, log_every=10,
                                    progress=False, device="cpu"))
    finally:
        loop._optimizer_step = original
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return per_step(ends, a.skip), [m["loss"] for m in lines]  # means over its 10-step windows


def kd_trainer(cache: Path, student: Path, out: Path, a):
    """((wall, cpu) seconds per step, losses) of KDTrainer, set up as examples/hf_trainer.py."""
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    import kdcache
    from kdcache.integrations.transformers import KDTrainer

    ends = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(clocks())

    shutil.rmtree(out, ignore_errors=True)
    args = TrainingArguments(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch_size, seed=0, learning_rate=1e-3,
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
        warmup_steps=kdcache.default_warmup(a.steps), max_grad_norm=1.0, dataloader_num_workers=2, use_cpu=True,
        ddp_find_unused_parameters=False, save_strategy="no", logging_steps=10, report_to=[], disable_tqdm=True)
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), args=args,
                        train_dataset=cache, losses_file=out / "losses.jsonl", callbacks=[StepEnds()])
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    windows = [statistics.fmean(losses[i:i + 10]) for i in range(0, len(losses), 10)]  # as train-student logs them
    return per_step(ends, a.skip), windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=5, help="first steps left out (start-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kdcache-bench-trainer")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher("clm", a.work / f"teacher-{a.vocab}-{a.hidden}", vocab_size=a.vocab, layers=2,
                           hidden=a.hidden)
    cache = dump(teacher, a.work / f"cache-{a.vocab}-{a.hidden}", k=64, max_length=128, limit=2000)
    student = student_dir(teacher, a.work / f"student-{a.vocab}-{a.hidden}-{a.layers}", a.layers)
    wall = {"train-student": [], "KDTrainer": []}
    cpu = {"train-student": [], "KDTrainer": []}
    for _ in range(a.repeats):  # alternating, so machine load hits both alike
        for name, run in (("train-student", train_student), ("KDTrainer", kd_trainer)):
            (w, c), losses = run(cache, student, a.work / f"run-{name}", a)
            wall[name] += w
            cpu[name] += c
            if name == "train-student":
                want = losses
            else:  # the same steps: same batches, same arithmetic
                assert len(losses) == len(want) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(losses, want))
    print(f"`{command_line()}`: Llama student L{a.layers}-H{a.hidden} from a directory, vocab {a.vocab}, "
          f"batch {a.batch_size}, top-64 cache, 2 loader workers, 1 torch thread, CPU; "
          f"{len(wall['train-student'])} steps each (losses equal)")
    print("\n| loop | wall ms/step | ÷ train-student | CPU ms/step | ÷ train-student |\n|---|---:|---:|---:|---:|")
    for name in wall:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {1000 * w:.1f} | {w / statistics.median(wall['train-student']):.3f} | {1000 * c:.1f} | "
              f"{c / statistics.median(cpu['train-student']):.3f} |")


if __name__ == "__main__":
    main()
