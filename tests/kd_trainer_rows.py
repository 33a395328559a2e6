"""Worker for test_own_trainer's torchrun test: KDTrainer for one epoch under DDP, each rank
writing the example ids it trained on and a checksum of its final weights to OUT/rank{r}.json."""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import kdcache
from kdcache.integrations.transformers import KDTrainer

cache_dir, student, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
seen = []


class Recording(KDTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        seen.extend(inputs["example_id"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


cache = kdcache.open_cache(cache_dir)
args = TrainingArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=4, learning_rate=1e-3,
                         seed=3, dataloader_num_workers=2, save_strategy="no", report_to=[], disable_tqdm=True,
                         use_cpu=True)
trainer = Recording(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), args=args,
                    train_dataset=cache)
trainer.train()
weights = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
(out / f"rank{args.process_index}.json").write_text(json.dumps(
    {"ids": seen, "weights": weights, "steps": trainer.state.global_step, "world": args.world_size,
     "steps_per_epoch": trainer.kd_stream.steps_per_epoch()}))
