"""Distil a Hugging Face student from a kdcache cache in your own PyTorch loop.

With the same --student, --seed, --batch-size and --lr this takes the steps `kdcache train-student`
takes (its defaults: T = 1, alpha = 0.5, AdamW, 6 % warm-up then linear decay, clipping at 1.0).
  python examples/own_loop.py --cache C --student DIR --out O --max-steps N --batch-size B --lr LR --seed S
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

import kdcache

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", required=True)
parser.add_argument("--student", required=True, help="Hugging Face model directory: the starting weights")
parser.add_argument("--out", required=True, type=Path)
parser.add_argument("--max-steps", type=int, required=True)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

cache = kdcache.open_cache(args.cache)  # checks the manifest and every shard
auto = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "seq-cls": AutoModelForSequenceClassification}
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = auto[cache.task].from_pretrained(args.student, dtype=torch.float32).to(device)
loss_fn = kdcache.DistillLoss(temperature=1.0, alpha=0.5)  # alpha * T² * KL + (1 - alpha) * CE
# This rank's micro-batches (RANK/WORLD_SIZE from torchrun), epoch after epoch, seeded order.
stream = kdcache.TrainStream(cache, batch_size=args.batch_size, seed=args.seed)
optimizer = kdcache.adamw(model, args.lr, weight_decay=0.01)
scheduler = kdcache.lr_schedule(optimizer, args.max_steps)  # 6 % warm-up, then linear decay
torch.manual_seed(args.seed + stream.dataset.rank)  # dropout, seeded as train-student seeds it

args.out.mkdir(parents=True, exist_ok=True)
model.train()
with open(args.out / "losses.jsonl", "w") as log:
    for step, batch in zip(range(1, args.max_steps + 1), stream):
        batch = kdcache.move_batch(batch, device)
        # Body over the batch, output layer only at the targets (chunked), loss on the cached targets.
        loss = kdcache.student_loss(model, cache.task, batch, loss_fn).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")

model.save_pretrained(args.out)
if cache.tokenizer_dir.is_dir():
    cache.load_tokenizer().save_pretrained(args.out)  # the student speaks the cache's tokenizer
