"""Distil a Hugging Face student from a kdcache cache inside transformers' Trainer (KDTrainer).

Same steps as `kdcache train-student` for the same --student, --seed, --batch-size and --lr; runs
under torchrun (DDP: each rank reads its own part of the cache); --resume continues the last
checkpoint in --out exactly (weights, optimiser, RNG and the stream's position).
  python examples/hf_trainer.py --cache C --student DIR --out O --max-steps N --batch-size B --lr LR --seed S \
      [--save-steps K] [--resume]
"""
import argparse
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          TrainingArguments)

import kdcache
from kdcache.integrations.transformers import KDTrainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", required=True)
parser.add_argument("--student", required=True, help="Hugging Face model directory: the starting weights")
parser.add_argument("--out", required=True, type=Path)
parser.add_argument("--max-steps", type=int, required=True)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every K steps (0: none)")
parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
args = parser.parse_args()

cache = kdcache.open_cache(args.cache)
auto = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "seq-cls": AutoModelForSequenceClassification}
model = auto[cache.task].from_pretrained(args.student, dtype=torch.float32)
training_args = TrainingArguments(
    output_dir=str(args.out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, seed=args.seed,
    # train-student's defaults: AdamW(0.9, 0.98, eps 1e-6), decay 0.01, 6 % warm-up, linear, clip 1.0, 2 workers
    learning_rate=args.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
    warmup_steps=kdcache.default_warmup(args.max_steps), lr_scheduler_type="linear", max_grad_norm=1.0,
    dataloader_num_workers=2, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
    use_cpu=not torch.cuda.is_available(),  # on CPU, also what makes torchrun processes use DDP (gloo)
    ddp_find_unused_parameters=False,  # every parameter is used: skip the extra graph traversal
    logging_steps=10, report_to=[], disable_tqdm=True)
losses = args.out / "losses.jsonl"
if not args.resume:
    losses.unlink(missing_ok=True)
trainer = KDTrainer(model=model, args=training_args, train_dataset=cache,
                    loss=kdcache.DistillLoss(temperature=1.0, alpha=0.5), losses_file=losses)
trainer.train(resume_from_checkpoint=True if args.resume else None)
trainer.save_model(str(args.out))  # the student (+ the cache's tokenizer): from_pretrained(--out) loads it
