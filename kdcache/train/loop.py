"""The training loop: plain PyTorch, read top to bottom (after nanoGPT's train.py).

cache -> TrainStream (this rank's partition) -> student body -> output layer at the targets
-> DistillLoss -> AdamW + warmup/decay schedule, with grad accumulation, clipping, autocast on
CUDA, DDP under torchrun, atomic checkpoints and exact resume. `_train` is the recipe, built from
the public pieces (kdcache/__init__.py) that examples/own_loop.py and KDTrainer use as well.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache.collate import move_batch
from ..cache.files import atomic_write_bytes, atomic_write_json
from ..cache.manifest import content_identity, enclosing_cache
from ..cache.storage import describe
from ..cache.stream import DEFAULT_SHUFFLE_BUFFER, open_cache
from ..errors import KdcacheError
from .. import distributed
from . import checkpoint
from .batches import TrainStream
from .forward import target_logits
from .losses import DEFAULT_CHUNK_ELEMENTS, SELECTION_WEIGHTINGS, DistillLoss, check_temperature
from ..models import auto_class
from .optim import adamw, lr_schedule
from .step import StudentLoss  # noqa: F401  (re-exported: benchmarks import it from here)
from .students import Sizes, build_student, init_from_teacher, load_pretrained, plan_student
from .watch import LossWatch

SUMMARY = "train_summary.json"
METRICS = "metrics.jsonl"
# Settings a checkpoint must share with the run that resumes it (else it would not be "exact").
# The cache is compared by content (manifest.content_identity), not by path: a cache moved or copied
# (another disk, a bucket) resumes, one re-dumped under the same path does not.
# Processes, loader workers, micro-batch size and accumulation may change as long as their global
# batch does (the stream re-partitions the epoch's unread rows; see kdcache.cache.partition).
RESUME_KEYS = ("cache_content", "student", "task", "global_batch", "seed", "temperature", "alpha", "tail",
               "online_teacher", "total_steps", "shuffle_buffer", "selection_weighting")
# What a checkpoint that predates a RESUME_KEYS entry was made with (selected caches were weighed per position).
RESUME_DEFAULTS = {"selection_weighting": "per-position"}


@dataclass
class TrainConfig:
    cache: Path
    student: str
    out: Path
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None          # None: 6% of the steps
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.5
    tail: str = "renorm"
    selection_weighting: str = SELECTION_WEIGHTINGS[0]  # a selected cache's loss weighting (train.losses)
    seed: int = 0
    sizes: Sizes = field(default_factory=Sizes)
    init_from_teacher: bool = False
    teacher: Path | None = None
    online_teacher: Path | None = None
    save_every: int = 0                      # 0: only at the end of a session
    resume: bool = False
    stop_after_steps: int | None = None      # end this session after N steps (checkpointed)
    device: str | None = None
    precision: str = "auto"
    num_workers: int = 2
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    log_every: int = 10
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    progress: bool = True


def _autocast(device: torch.device, precision: str):
    """(autocast context factory, grad scaler or None). Mixed precision only on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext, None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _check_out_dir(out: Path, resume: bool, cache_dir: Path) -> dict | None:
    """Refuse to overwrite a run, to nest a student and a cache, or to --resume nothing;
    returns an existing finished summary when resuming one."""
    inside = enclosing_cache(out)
    if inside is not None:
        raise KdcacheError(f"--out {out} is inside the cache {inside}: the student's files would mix with the cache's "
                           "(and `pandas.read_parquet(CACHE/data)` would break); choose an --out outside the cache")
    if Path(os.path.abspath(cache_dir)).is_relative_to(os.path.abspath(out)):
        raise KdcacheError(f"--cache {cache_dir} is inside --out {out}: the student's folder would carry the cache "
                           "along, and replacing the student would lose it; choose an --out that does not hold the cache")
    summary_path = out / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    ckpt = checkpoint.find_checkpoint(out)
    if not resume and (ckpt is not None or (summary or {}).get("done")):
        what = "a finished student" if (summary or {}).get("done") else f"a checkpoint ({ckpt.name})"
        raise KdcacheError(f"--out {out} already holds {what}; pass --resume to continue it, or choose another --out")
    if resume and ckpt is None and not any((out / name).is_file() for name in (SUMMARY, METRICS)):
        # No train-student run was ever started there: most likely a mistyped --out, which must
        # not silently train from scratch.
        raise KdcacheError(f"--resume: --out {out} holds no checkpoint and no run to continue; check the --out "
                           "path, or drop --resume to start a new run there")
    if resume and ckpt is None and not (summary or {}).get("done"):
        # A run that stopped before its first checkpoint: continuing it means starting it over.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume: the run in {out} stopped before its first checkpoint; starting it again from step 0",
                  file=sys.stderr)
    return summary if (summary or {}).get("done") else None


def _load_teacher(path: Path, task: str, cache, device):
    try:
        teacher = load_pretrained(auto_class(task), path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"--online-teacher {path}: cannot load a {task} model ({str(e).splitlines()[0]}); "
                           "pass the teacher's save_pretrained directory") from None
    want = cache.view.target_vocab_size
    have = teacher.config.num_labels if task == "seq-cls" else teacher.config.vocab_size
    if have != want:
        raise KdcacheError(f"--online-teacher {path} has {have} outputs, the cache's teacher {want}; "
                           "use the teacher the cache was made with")
    return teacher.to(device).eval().requires_grad_(False)


def train(cfg: TrainConfig) -> dict:
    """Train one student; returns the train summary (also written to OUT/train_summary.json)."""
    # Join the process group first: a check that fails on one rank then stops every rank with its message.
    dist = distributed.setup(cfg.device)
    try:
        with dist.failing_together():
            return _checked_train(cfg, dist)
    finally:
        dist.close()


def _checked_train(cfg: TrainConfig, dist) -> dict:
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise KdcacheError("pass either --max-steps or --epochs, not both")
    if cfg.alpha < 0 or cfg.alpha > 1:
        raise KdcacheError(f"--alpha {cfg.alpha} must be within [0, 1] (weight of the KD term)")
    if cfg.temperature <= 0:
        raise KdcacheError(f"--temperature {cfg.temperature} must be > 0")
    out = Path(cfg.out)
    cache = open_cache(cfg.cache)  # checks every shard before anything is written
    task = cache.task
    kind = cache.view.target_kind
    if cfg.tail == "bucket" and cache.kind.draws and cfg.alpha > 0 and not cfg.online_teacher:
        raise KdcacheError(f"--tail bucket keeps the mass outside a top-k cache's ids as one bucket; {cfg.cache} holds "
                           f"{kind} targets, whose draws already estimate that tail without bias: drop --tail")
    if cfg.alpha > 0 and not cfg.online_teacher:
        check_temperature(cfg.temperature, cache.view.draw_logprobs, cfg.cache)
    finished = _check_out_dir(out, cfg.resume, Path(cfg.cache))
    if finished is not None:
        return finished
    plan = plan_student(cfg.student, cache.view, cache_tokenizer_dir=cache.tokenizer_dir, sizes=cfg.sizes,
                        teacher=cfg.teacher, cache_dir=cache.dir)
    if cfg.init_from_teacher and plan.kind == "model":
        raise KdcacheError(f"--init-from-teacher initialises a fresh student; {cfg.student} is a trained model "
                           "directory (drop --init-from-teacher to continue from its weights)")
    return _train(cfg, dist, cache, task, plan, out)


def _train(cfg: TrainConfig, dist, cache, task: str, plan, out: Path) -> dict:
    """The recipe: student, loss, stream, optimiser; resume; steps; save."""
    device = dist.device
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_student(plan, task)
    layer_map = init_from_teacher(model, task, cache.view, cfg.teacher) if cfg.init_from_teacher else None
    model.to(device)
    teacher = _load_teacher(Path(cfg.online_teacher), task, cache, device) if cfg.online_teacher else None

    loss_fn = DistillLoss(cfg.temperature, cfg.alpha, cfg.tail, cfg.chunk_elements, cfg.selection_weighting)
    selected = cache.view.select_positions is not None
    # Soft targets are decoded only when the KD term uses them from the cache.
    batches = TrainStream(cache, batch_size=cfg.batch_size, seed=cfg.seed, grad_accum=cfg.grad_accum,
                          rank=dist.rank, world_size=dist.world_size, num_workers=cfg.num_workers,
                          shuffle_buffer=cfg.shuffle_buffer, pin_memory=device.type == "cuda",
                          soft_targets=loss_fn.uses_soft_targets and teacher is None)
    steps_per_epoch = batches.steps_per_epoch()  # ceil(rows / global batch): the last step may be short
    total_steps = cfg.max_steps if cfg.max_steps is not None else math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, fused=device.type == "cuda")
    scheduler = lr_schedule(optimizer, total_steps, cfg.warmup_steps, cfg.scheduler)
    autocast, scaler = _autocast(device, cfg.precision)
    net = StudentLoss(model, task, loss_fn)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    identity = {"cache": describe(cfg.cache), "cache_content": content_identity(cache.view),
                "student": plan.spec, "task": task,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                "temperature": cfg.temperature, "alpha": cfg.alpha, "tail": cfg.tail,
                # Only where it changes the loss: a selected cache's soft targets in use.
                "selection_weighting": cfg.selection_weighting if selected and loss_fn.uses_soft_targets
                and not cfg.online_teacher else None,
                "online_teacher": str(cfg.online_teacher) if cfg.online_teacher else None,
                "total_steps": total_steps, "world_size": dist.world_size, "num_workers": cfg.num_workers,
                "global_batch": batches.geometry.global_batch, "shuffle_buffer": batches.dataset.shuffle_buffer}
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs across ranks, reproducibly
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "log_sums": torch.zeros(3), "logged_steps": 0}
    ckpt = checkpoint.find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = _restore(ckpt, cfg, dist, out, identity, model, optimizer, scheduler, scaler, batches)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / METRICS, state["step"])
        atomic_write_json(out / SUMMARY, _summary(cfg, plan, identity, sum(p.numel() for p in model.parameters()),
                                                  state["step"], state["tokens"], state["seconds"], done=False,
                                                  layer_map=layer_map))
    log = _MetricsLog(cfg, dist, out, plan.spec, total_steps, state)

    def save_checkpoint():
        log.flush_tokens()
        checkpoint.save(out, dist, model=model, meta={"step": log.step, "identity": identity},
                        trainer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                       "scaler": scaler.state_dict() if scaler is not None else None,
                                       "step": log.step, "tokens": log.tokens, "seconds": log.seconds,
                                       "stream": batches.state_dict()},
                        rank_state={"torch_rng": torch.get_rng_state(),
                                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                    # the open metrics window, so the next line averages the same steps
                                    "log_sums": log.sums.clone(), "logged_steps": log.logged_steps})

    stream = iter(batches)
    session_steps = 0
    model.train()
    try:
        while log.step < total_steps and (cfg.stop_after_steps is None or session_steps < cfg.stop_after_steps):
            step_start = time.perf_counter()
            for micro in range(cfg.grad_accum):
                batch = move_batch(next(stream), device, non_blocking=True)
                sums = _forward_backward(net, batch, teacher, task, autocast, scaler, dist, last=micro == cfg.grad_accum - 1,
                                         grad_accum=cfg.grad_accum, use_teacher=loss_fn.uses_soft_targets)
                log.add_micro_batch(sums, batch["num_tokens"])
            _optimizer_step(model, optimizer, scheduler, scaler, cfg.max_grad_norm)
            session_steps += 1
            log.end_step(time.perf_counter() - step_start, batches.epoch, scheduler.get_last_lr()[0])
            if cfg.save_every and log.step % cfg.save_every == 0 and log.step < total_steps:
                save_checkpoint()
        log.flush_tokens()
    finally:
        log.close()

    done = log.step >= total_steps
    summary = _summary(cfg, plan, identity, sum(p.numel() for p in model.parameters()), log.step, log.tokens,
                       log.seconds, done=done, layer_map=layer_map)
    summary["loss_warnings"] = log.watch.warnings if log.watch is not None else []
    if not done:
        save_checkpoint()  # session ended early (--stop-after-steps): resume from exactly here
    elif dist.is_main:
        model.save_pretrained(out)
        _save_tokenizer(cache, out)
        checkpoint.remove(out)
    if dist.is_main:
        atomic_write_json(out / SUMMARY, summary)
    dist.barrier()
    return summary


def _forward_backward(net, batch, teacher, task, autocast, scaler, dist, *, last: bool, grad_accum: int,
                      use_teacher: bool) -> torch.Tensor:
    """One micro-batch: (online teacher,) loss, backward (gradients sync only on the step's last
    one); returns [loss, kd, hard] / grad_accum for the metrics."""
    teacher_logits = None
    if teacher is not None and use_teacher:
        with torch.no_grad(), autocast():
            teacher_logits = target_logits(teacher, task, batch)
    sync = nullcontext() if not dist.enabled or last else net.no_sync()
    with sync:
        with autocast():
            loss, kd, hard = net(batch, teacher_logits)
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return torch.stack([loss.detach(), kd, hard]).float().cpu() / grad_accum


def _optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm: float) -> None:
    """Clip (0: off), step (through the fp16 grad scaler if any), schedule, zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _restore(ckpt: Path, cfg: TrainConfig, dist, out: Path, identity: dict, model, optimizer, scheduler, scaler,
             batches: TrainStream) -> dict:
    """Load a checkpoint after checking it belongs to this run; returns the run state."""
    device = dist.device
    meta = checkpoint.read_meta(ckpt)
    keys = RESUME_KEYS if "cache_content" in meta["identity"] else ("cache", *RESUME_KEYS[1:])  # older checkpoints
    saved = {**{k: v for k, v in RESUME_DEFAULTS.items() if identity.get(k) is not None}, **meta["identity"]}
    diffs = [k for k in keys if saved.get(k) != identity.get(k)]
    if diffs and diffs[0] == "cache_content":
        raise KdcacheError(
            f"cannot resume {out}: --cache {cfg.cache} does not hold the cache its checkpoint was trained on "
            f"(that was {meta['identity'].get('cache')}; the identity or the shards' checksums differ, e.g. it was "
            "re-dumped); resume with that cache (at any path), or start a new run in another --out")
    if diffs and diffs[0] == "global_batch":
        raise KdcacheError(
            f"cannot resume {out} exactly: its global batch (processes x --grad-accum x --batch-size) was "
            f"{meta['identity'].get('global_batch')}, this run's is {identity['global_batch']}; a resized resume "
            "keeps it (and with it the steps per epoch and the learning-rate schedule): choose --batch-size and "
            "--grad-accum to match")
    if diffs:
        k = diffs[0]
        raise KdcacheError(f"cannot resume {out}: its checkpoint was made with {k}={saved.get(k)!r}, "
                           f"this run has {identity.get(k)!r}; rerun with the original options or use another --out")
    resized = meta["identity"].get("world_size") != dist.world_size
    # After a resize a rank may have no file of its own: it takes rank 0's metrics window.
    trainer_state, rank_state = checkpoint.load(ckpt, 0 if resized else dist.rank, model=model)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    if scaler is not None and trainer_state.get("scaler"):
        scaler.load_state_dict(trainer_state["scaler"])
    step = trainer_state["step"]
    if resized:  # other ranks, other dropout streams: seeded from (seed, rank, step), reproducibly
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist.rank, step]).generate_state(1)[0]))
    else:
        torch.set_rng_state(rank_state["torch_rng"])
        if device.type == "cuda" and rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], device)
    # The position is the same on every rank; under another geometry the stream
    # re-partitions the epoch's unread rows (or refuses, saying why).
    if "stream" not in trainer_state:
        raise KdcacheError(f"cannot resume {out}: its checkpoint was made by an older kdcache whose stream position "
                           "this one cannot read; resume with that kdcache, or start the run again in another --out")
    batches.load_state_dict(trainer_state["stream"])
    return {"step": step, "tokens": trainer_state["tokens"], "seconds": trainer_state["seconds"],
            "log_sums": rank_state["log_sums"], "logged_steps": rank_state["logged_steps"]}


class _MetricsLog:
    """Step, token and time counters, the progress bar, metrics.jsonl lines (means over the
    last --log-every steps) and the loss watch."""

    def __init__(self, cfg: TrainConfig, dist, out: Path, spec: str, total_steps: int, state: dict):
        from tqdm.auto import tqdm

        self.cfg, self.dist, self.total_steps = cfg, dist, total_steps
        self.step, self.tokens, self.seconds = state["step"], state["tokens"], state["seconds"]
        self.sums, self.logged_steps = state["log_sums"], state["logged_steps"]
        self.pending_tokens = 0  # this rank's tokens not yet summed over ranks into `tokens`
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=self.step, desc=f"train {spec}", unit="step", dynamic_ncols=True,
                        disable=not (dist.is_main and cfg.progress))
        self.file = open(out / METRICS, "a") if dist.is_main else None
        self.watch = LossWatch.from_metrics(out / METRICS, total_steps, cfg.lr) if dist.is_main else None

    def flush_tokens(self) -> None:
        self.tokens += int(self.dist.sum(self.pending_tokens))
        self.pending_tokens = 0

    def add_micro_batch(self, sums: torch.Tensor, num_tokens: int) -> None:
        self.sums += sums
        self.window_tokens += num_tokens
        self.pending_tokens += num_tokens

    def end_step(self, seconds: float, epoch: int, lr: float) -> None:
        self.step += 1
        self.logged_steps += 1
        self.seconds += seconds
        self.bar.update(1)
        if self.step % self.cfg.log_every and self.step != self.total_steps:
            return
        step_tokens = int(self.dist.sum(self.window_tokens))
        self.flush_tokens()
        rate = step_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        loss_avg, kd_avg, hard_avg = (self.sums / self.logged_steps).tolist()
        record = {"step": self.step, "epoch": epoch, "loss": loss_avg,
                  "kd_loss": kd_avg if self.cfg.alpha > 0 else None,
                  "hard_loss": hard_avg if self.cfg.alpha < 1 else None,
                  "lr": lr, "tokens": self.tokens, "tokens_per_second": rate}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{rate:,.0f}")
        for warning in self.watch.update(self.step, loss_avg) if self.watch is not None else ():
            self.bar.write(f"[train-student] warning: {warning}", file=sys.stderr)
        self.sums.zero_()
        self.logged_steps, self.window_tokens, self.window_start = 0, 0, time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _save_tokenizer(cache, out: Path) -> None:
    if cache.tokenizer_dir.is_dir():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(cache.tokenizer_dir).save_pretrained(out)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _summary(cfg: TrainConfig, plan, identity, num_parameters, step, tokens, seconds, *, done, layer_map) -> dict:
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "done": done, "steps": step, "total_steps": identity["total_steps"], "tokens": tokens,
        "seconds": round(seconds, 3), "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "num_parameters": num_parameters,
        "student": {"spec": plan.spec, "kind": plan.kind, "model_type": plan.config.model_type,
                    "layers": plan.config.num_hidden_layers, "hidden": plan.config.hidden_size,
                    "heads": plan.config.num_attention_heads, "init_from_teacher_layers": layer_map},
        "cache": identity["cache"], "task": identity["task"], "alpha": cfg.alpha,
        "online_teacher": identity["online_teacher"], "world_size": identity["world_size"], "args": args,
    }
