"""transformers' Trainer distilling from a kdcache cache: `KDTrainer`.

    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=TrainingArguments(...),
                        train_dataset=kdcache.open_cache("cache/"), loss=kdcache.DistillLoss(alpha=0.5))
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

What it changes in Trainer, and why:
- Data: the cache's own stream (kdcache.TrainStream), not a DataLoader over it: batches are collated
  by the stream, each rank reads its own part of the cache (rank/world from TrainingArguments), the
  order is train-student's for the same seed, per_device_train_batch_size, gradient_accumulation_steps,
  dataloader_num_workers and world size, and epochs follow one another.
- Loss: DistillLoss on the student's features at the target positions, the output layer run in
  chunks (never tokens x vocab logits), for a causal LM, masked LM or sequence classifier.
  Under DDP the computation goes through the wrapped model's forward, so gradients are synchronised.
- Optimiser: train-student's AdamW (decay on matrices only) with TrainingArguments' learning_rate,
  weight_decay, adam_beta1/2, adam_epsilon; Trainer's schedule (lr_scheduler_type, warmup_steps)
  and clipping (max_grad_norm). Pass optimizers=(...) to use your own.
- Dropout: seeded with seed + process index at the start (as train-student).
- Resume: the stream position is saved in each checkpoint as kdcache_stream.json (plain JSON) and
  restored by train(resume_from_checkpoint=...), together with Trainer's own state: the run
  continues exactly. Trainer's batch skipping is turned off (ignore_data_skip): not needed.
- Length: set max_steps, or num_train_epochs, which becomes ceil(epochs x steps per epoch).
Not supported: DeepSpeed/FSDP (DDP only), evaluation datasets through compute_loss.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..cache.stream import OpenCache, open_cache
from ..errors import KdcacheError
from ..train.batches import TrainStream
from ..train.losses import DistillLoss, check_temperature
from ..train.optim import adamw
from ..train.step import student_loss

STREAM_STATE = "kdcache_stream.json"
TRAINER_STATE_NAME = "trainer_state.json"  # written last into a Trainer checkpoint (transformers.trainer)


class KDTrainer(Trainer):
    """Trainer whose train_dataset is a kdcache cache (OpenCache or its path/URI) or a TrainStream.

    loss: the DistillLoss (default: train-student's, T = 1, alpha = 0.5). losses_file: a JSON-lines
    file that rank 0 appends {"step", "loss"} to after every optimizer step (the mean over its
    micro-batches: the loss the optimizer stepped on); lines past a resumed checkpoint are dropped.
    """

    def __init__(self, model=None, args=None, train_dataset=None, *, loss: DistillLoss | None = None,
                 losses_file: str | Path | None = None, **kwargs):
        if isinstance(train_dataset, TrainStream):
            self.kd_cache, given = train_dataset.cache, train_dataset
        elif isinstance(train_dataset, (OpenCache, str, Path)):
            self.kd_cache, given = (train_dataset if isinstance(train_dataset, OpenCache)
                                    else open_cache(train_dataset)), None
        else:
            raise KdcacheError("KDTrainer: train_dataset must be a kdcache cache (kdcache.open_cache(...) or its path) "
                               f"or a kdcache.TrainStream, not {type(train_dataset).__name__}")
        self.kd_loss = loss or DistillLoss()
        if self.kd_loss.uses_soft_targets:
            check_temperature(self.kd_loss.temperature, self.kd_cache.view.draw_logprobs, self.kd_cache.dir)
        if kwargs.get("processing_class") is None and self.kd_cache.tokenizer_dir.is_dir():
            kwargs["processing_class"] = self.kd_cache.load_tokenizer()  # saved with every checkpoint
        super().__init__(model=model, args=args, train_dataset=None, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean per micro-batch: Trainer divides by accumulation
        self.args.ignore_data_skip = True        # the stream restores its own position
        self.kd_stream = self._stream(given)
        if self.args.max_steps <= 0:             # epochs -> steps, as train-student counts them
            self.args.max_steps = math.ceil(self.args.num_train_epochs * self.kd_stream.steps_per_epoch())
        self.kd_losses_file = Path(losses_file) if losses_file else None
        self._kd_step_losses: list[torch.Tensor] = []
        self._kd_resume_state: dict | None = None
        self.add_callback(_KDCallback(self))

    def _stream(self, given: TrainStream | None) -> TrainStream:
        a = self.args
        want = {"batch_size": a.per_device_train_batch_size, "grad_accum": a.gradient_accumulation_steps,
                "world": a.world_size, "workers": max(1, a.dataloader_num_workers)}
        if given is not None:
            g = given.geometry
            have = {"batch_size": g.batch_size, "grad_accum": g.grad_accum, "world": g.world, "workers": g.workers}
            if have != want or given.dataset.rank != a.process_index:
                raise KdcacheError(f"KDTrainer: the TrainStream was made for {have} (rank {given.dataset.rank}), "
                                   f"TrainingArguments say {want} (rank {a.process_index}); pass the cache instead "
                                   "and let the Trainer's settings decide")
            if self.kd_loss.uses_soft_targets and not given.dataset.soft_targets:
                raise KdcacheError("KDTrainer: the TrainStream was made with soft_targets=False but the loss's alpha > 0 "
                                   "needs them; make it with soft_targets=True")
            return given
        seed = a.data_seed if a.data_seed is not None else a.seed
        return TrainStream(self.kd_cache, batch_size=a.per_device_train_batch_size, seed=seed,
                           grad_accum=a.gradient_accumulation_steps, rank=a.process_index, world_size=a.world_size,
                           num_workers=a.dataloader_num_workers, soft_targets=self.kd_loss.uses_soft_targets,
                           pin_memory=a.dataloader_pin_memory and torch.cuda.is_available())

    # -- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self):
        if self._kd_resume_state is not None:
            self.kd_stream.load_state_dict(self._kd_resume_state)
            self._kd_resume_state = None
        return _Batches(self.kd_stream)

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        task = _task_of(inner, self.kd_cache.task)

        def forward(batch):
            out = student_loss(inner, task, batch, self.kd_loss)
            return out.loss, out.kd, out.hard

        # Through `model` (DDP's forward when wrapped: it arms the gradient all-reduce), with the
        # student's forward standing in for the loss computation for this one call.
        with _forward_as(inner, forward), self.accelerator.autocast():
            loss, kd, hard = model(inputs)
        if model.training:  # only training micro-batches make up the step's loss
            self._kd_step_losses.append(loss.detach())
        return (loss, {"kd": kd, "hard": hard}) if return_outputs else loss

    # -- optimiser -----------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a = self.args
            self.optimizer = adamw(model or self.model, a.learning_rate, a.weight_decay,
                                   betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        return self.optimizer

    # -- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # Written first, so a checkpoint folder that has Trainer's files also has the position.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, STREAM_STATE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"step": self.state.global_step, "stream": self.kd_stream.state_dict()}, f)
            os.replace(tmp, os.path.join(folder, STREAM_STATE))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise KdcacheError(f"resume_from_checkpoint=True: {self.args.output_dir} holds no checkpoint-N folder; "
                                   "train without resuming, or point output_dir at the run to continue")
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / STREAM_STATE
            if not path.is_file():
                raise KdcacheError(f"{resume_from_checkpoint} has no {STREAM_STATE}: it was not saved by KDTrainer, so "
                                   "the stream position is unknown; resume from a KDTrainer checkpoint")
            saved = json.loads(path.read_text())
            self._kd_resume_state = saved["stream"]
            self._trim_losses(int(saved["step"]))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _trim_losses(self, step: int) -> None:
        f = self.kd_losses_file
        if f is None or not self.args.should_save or not f.is_file():
            return
        keep = [line for line in f.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        f.write_text("".join(line + "\n" for line in keep))

    def _kd_end_step(self, step: int) -> None:
        losses, self._kd_step_losses = self._kd_step_losses, []
        if self.kd_losses_file is None or not self.args.should_save or not losses:
            return
        loss = float(torch.stack(losses).float().mean())
        self.kd_losses_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.kd_losses_file, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N folder that was finished: Trainer writes trainer_state.json last, so a
    run killed while saving leaves a folder without it, which resuming must skip (Trainer's own
    get_last_checkpoint would pick it)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[-1]), p) for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.name.split("-")[-1].isdigit() and (p / TRAINER_STATE_NAME).is_file() and (p / STREAM_STATE).is_file()]
    return str(max(steps)[1]) if steps else None


class _KDCallback(TrainerCallback):
    def __init__(self, trainer: KDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # train-student's dropout streams; a resumed run then loads its checkpoint's RNG state.
        torch.manual_seed(args.seed + args.process_index)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._kd_end_step(state.global_step)


class _Batches:
    """The stream as Trainer iterates it: endless, no length (Trainer then counts max_steps)."""

    def __init__(self, stream: TrainStream):
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)


@contextmanager
def _forward_as(module: torch.nn.Module, forward):
    """Let module(...) run `forward` for a while (an instance attribute shadows the class's
    forward; an instance forward set by accelerate is put back afterwards)."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def _task_of(model, cache_task: str) -> str:
    """The cache's task, checked against the model's head (a mismatch would train nonsense)."""
    name = type(model).__name__
    expected = {"clm": "CausalLM", "mlm": "MaskedLM", "seq-cls": "SequenceClassification"}[cache_task]
    if expected not in name:
        raise KdcacheError(f"the cache holds {cache_task} targets but the model is a {name}; load the student with "
                           f"AutoModelFor{expected}")
    return cache_task
