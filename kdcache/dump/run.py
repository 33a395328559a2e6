"""The dump loop: validate inputs, plan rows and shards, run the teacher, hand shards to the writer.

Resume and multi-process dumping follow from one rule: shard i always holds the same rows.
A shard is complete once its sidecar exists; a run skips complete shards; under torchrun rank r
takes shards i with i % world_size == r, and rank 0 keeps the manifest.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..cache import schema as S
from ..cache.manifest import atomic_write_json, identity_differences, manifest_path, read_manifest
from ..cache.shards import complete_shards, remove_partial_files
from ..errors import KdcacheError
from .batching import make_batches, padded_tokens
from .corpus import load_corpus
from .rows import MaskingRecipe, RowPlan, tokenize_corpus
from .targets import sampled_targets, topk_targets
from .teacher import load_model, load_teacher
from .writer import ShardWriter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_TOKENS_PER_BATCH = 8192
# Draws per position for the sampled target kinds (Anshumann et al. 2025 report near-full-KD
# quality at ~12 unique tokens per position; 16 draws give ~6-12 distinct ids on an LM teacher).
DEFAULT_SAMPLES = 16


@dataclass
class DumpOptions:
    teacher: str
    data: str
    out: Path
    task: str | None = None
    split: str = "train"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = None
    max_length: int | None = None
    packing: bool | None = None
    mlm_probability: float = 0.15
    mask_copies: int = 1
    top_k: int = 64
    targets: str = S.TOP_K
    samples: int = DEFAULT_SAMPLES
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    max_tokens_per_batch: int | None = None
    shard_rows: int = 4096
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    echo: object = print


@dataclass
class DumpResult:
    manifest: dict | None
    rows: int
    positions: int
    num_shards: int
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    summary: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- distributed helpers (gloo: barriers only)

class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self.started = True

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def share_error(self, message: str | None) -> None:
        """Rank 0's validation outcome, raised on every rank (so no rank waits at a barrier forever)."""
        if self.world > 1:
            import torch.distributed as dist
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            raise KdcacheError(message)

    def close(self):
        if self.started:
            import torch.distributed as dist
            dist.destroy_process_group()


# ---------------------------------------------------------------- validation

def resolve_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KdcacheError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {device} requested but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return dtype


def check_output_dir(out: Path, new_identity: dict, overwrite: bool) -> bool:
    """Decide what happens to --out; returns True when an existing cache must be cleared first.

    Only reads: nothing is deleted here (the caller clears after all inputs are validated).
    """
    if out.exists() and not out.is_dir():
        raise KdcacheError(f"--out {out} is a file, not a directory; choose a new directory for the cache")
    if not out.exists():
        return False
    if manifest_path(out).is_file():
        try:
            old = read_manifest(out)
        except KdcacheError:
            if overwrite:
                return True
            raise
        diffs = identity_differences(old, new_identity)
        if diffs and not overwrite:
            raise KdcacheError(f"--out {out} holds a different cache (differs in: {', '.join(diffs)}); "
                               "use another --out, or pass --overwrite to replace it")
        return overwrite
    if any(out.iterdir()):
        raise KdcacheError(f"--out {out} exists, is not empty and is not a kdcache cache; refusing to write into it; "
                           "choose a new or empty directory")
    return False


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kdcache-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KdcacheError(f"--out {out} is not writable ({e.strerror or type(e).__name__}); choose a directory you can write to") from None


def clear_cache(out: Path) -> None:
    """Remove only what a cache consists of, never other files a user may keep there."""
    manifest_path(out).unlink(missing_ok=True)
    for sub in (S.SHARD_DIR, S.TOKENIZER_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)


def special_token_ids(tokenizer) -> dict:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "cls", "sep", "mask")}


def build_manifest(opts: DumpOptions, teacher, corpus, *, task, k, dtype, max_length, packing, num_shards,
                   targets: dict | None = None) -> dict:
    config = teacher.config
    id2label = None
    if task == "seq-cls":
        id2label = {str(i): str(v) for i, v in sorted((int(i), v) for i, v in (getattr(config, "id2label", None) or {}).items())}
    return {
        "format_version": S.FORMAT_VERSION,
        "kdcache_version": __version__,
        "task": task,
        "k": k,
        "targets": targets or {"kind": S.TOP_K, "k": k, "samples": 0},
        "vocab_size": teacher.vocab_size,
        "target_vocab_size": teacher.target_vocab_size,
        "num_labels": teacher.target_vocab_size if task == "seq-cls" else None,
        "id2label": id2label,
        "dtype": dtype,
        "max_length": max_length,
        "packing": packing,
        "mlm_probability": opts.mlm_probability if task == "mlm" else None,
        "mask_copies": opts.mask_copies if task == "mlm" else None,
        "seed": opts.seed,
        "shard_rows": opts.shard_rows,
        "token_type_ids": bool(corpus.has_pair),
        "special_token_ids": special_token_ids(teacher.tokenizer),
        "teacher": teacher.fingerprint,
        "tokenizer": {"sha256": teacher.tokenizer_sha256, "dir": S.TOKENIZER_DIR},
        "data": corpus.description,
        "complete": False,
        "num_shards": num_shards,
        "shards": [],
        "totals": {"rows": 0, "positions": 0, "bytes": 0},
        "dump": {},
    }


def with_shards(manifest: dict, out: Path) -> dict:
    shards = [stats for _, stats in sorted(complete_shards(out).items()) if stats["index"] < manifest["num_shards"]]
    manifest = dict(manifest, shards=shards)
    manifest["totals"] = {key: sum(s[key] for s in shards) for key in ("rows", "positions", "bytes")}
    manifest["complete"] = len(shards) == manifest["num_shards"]
    return manifest


def validate(opts: DumpOptions, dist: Dist):
    """Everything that can be wrong with the inputs, checked before anything is written."""
    if opts.targets not in S.TARGET_KINDS:
        raise KdcacheError(f"--targets {opts.targets!r} is not a target kind; use one of {', '.join(S.TARGET_KINDS)}")
    if opts.top_k < 1:
        raise KdcacheError(f"--top-k must be >= 1, got {opts.top_k}")
    if S.has_samples(opts.targets) and not 1 <= opts.samples <= 65535:
        raise KdcacheError(f"--samples must be within 1..65535 for --targets {opts.targets}, got {opts.samples}")
    if opts.shard_rows < 1:
        raise KdcacheError(f"--shard-rows must be >= 1, got {opts.shard_rows}")
    if opts.mask_copies < 1:
        raise KdcacheError(f"--mask-copies must be >= 1, got {opts.mask_copies}")
    if not 0 < opts.mlm_probability < 1:
        raise KdcacheError(f"--mlm-probability must be in (0, 1), got {opts.mlm_probability}")
    if opts.limit is not None and opts.limit < 1:
        raise KdcacheError(f"--limit must be >= 1, got {opts.limit}")
    device = resolve_device(opts.device, dist)
    dtype = resolve_dtype(opts.dtype, device)
    teacher = load_teacher(opts.teacher, task=opts.task, trust_remote_code=opts.trust_remote_code, load_weights=False)
    task = teacher.task
    if task == "seq-cls":
        if opts.targets != S.TOP_K:
            raise KdcacheError(f"--targets {opts.targets} is for LM teachers; a sequence-classification cache "
                               "already stores every class exactly: drop --targets (or pass --targets top-k)")
        k = teacher.target_vocab_size  # the whole label set: classification targets are tiny
        packing = None
    else:
        if opts.top_k > teacher.target_vocab_size:
            raise KdcacheError(f"--top-k {opts.top_k} exceeds the teacher's vocabulary of {teacher.target_vocab_size}; "
                               f"pass --top-k {teacher.target_vocab_size} or less")
        k = 0 if opts.targets == S.SAMPLE else opts.top_k
        if opts.targets == S.TOP_K_SAMPLE and k >= teacher.target_vocab_size:
            raise KdcacheError(f"--targets top-k+sample with --top-k {k} leaves no tail of the teacher's "
                               f"{teacher.target_vocab_size} outputs to sample; pass a smaller --top-k or --targets top-k")
        packing = True if opts.packing is None else opts.packing
        if opts.text_pair_column:
            raise KdcacheError("--text-pair-column is for sequence-pair classification teachers (--task seq-cls)")
        if opts.label_column:
            raise KdcacheError("--label-column is for classification teachers; LM labels are the tokens themselves")
    limit = teacher.max_positions
    max_length = opts.max_length or min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if limit is not None and max_length > limit:
        raise KdcacheError(f"--max-length {max_length} is beyond the teacher's limit of {limit} positions; "
                           f"pass --max-length {limit} or less")
    if max_length < 2:
        raise KdcacheError(f"--max-length must be >= 2, got {max_length}")
    corpus = load_corpus(opts.data, split=opts.split, text_column=opts.text_column,
                         text_pair_column=opts.text_pair_column, label_column=opts.label_column, limit=opts.limit)
    if not opts.dry_run:
        load_model(teacher, dtype=DTYPES[dtype], device=device)
        if task != "seq-cls" and k > teacher.target_vocab_size:
            raise KdcacheError(f"--top-k {k} exceeds the teacher's output size {teacher.target_vocab_size}")
    return device, dtype, teacher, corpus, task, k, packing, max_length


# ---------------------------------------------------------------- forward

class TeacherRunner:
    """Pads a batch on the right, runs the teacher, returns host-side soft targets per row.

    Right padding keeps default position ids correct for every architecture.
    kind/samples/seed: the target kind (top-k, sample, top-k+sample), draws per position and the
    seed the draws are keyed by (with each target's example id and position).
    """

    def __init__(self, teacher, task: str, k: int, device: torch.device, pad_id: int, *,
                 kind: str = S.TOP_K, samples: int = 0, seed: int = 0):
        self.model, self.task, self.k, self.device, self.pad_id = teacher.model, task, k, device, pad_id
        self.kind, self.samples, self.seed = kind, samples, seed
        self.pin = device.type == "cuda"

    def collate(self, rows) -> dict:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long) if rows[0].token_type_ids is not None else None
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.from_numpy(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
            if tt is not None:
                tt[i, :len(r.input_ids)] = torch.from_numpy(r.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if tt is not None:
            batch["token_type_ids"] = tt
        if self.pin:
            batch = {key: v.pin_memory() for key, v in batch.items()}
        return {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}

    def forward(self, batch: dict) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.task == "clm" else {}
        with torch.inference_mode():
            return self.model(**batch, **kwargs).logits

    def device_targets(self, logits, b, p, e) -> tuple:
        """(top-k ids, top-k log-probs, finite flags, [sampled ids, log-probs, counts] or None) for the
        targets at rows b, positions p (example ids e), computed on the teacher's device."""
        if self.kind == S.TOP_K:
            return (*topk_targets(logits, b, p, self.k), None)
        drawn = sampled_targets(logits, b, p, e, seed=self.seed, samples=self.samples,
                                head=self.k if self.kind == S.TOP_K_SAMPLE else 0)
        # Counts fit 16 bits for any N the CLI allows below 2^15: half the bytes to copy to the host.
        counts = drawn["counts"].to(torch.int16) if self.samples < 2**15 else drawn["counts"]
        return drawn["head_ids"], drawn["head_logprobs"], drawn["finite"], [drawn["ids"], drawn["logprobs"], counts]

    def launch(self, rows) -> tuple:
        """Queue the forward and top-k of one batch; on CUDA this returns before the GPU is done,
        so the host can prepare the next batch meanwhile (finish() waits)."""
        batch = self.collate(rows)
        logits = self.forward(batch)
        with torch.inference_mode():
            if self.task == "seq-cls":
                ids, values, finite = topk_targets(logits, None, None, self.k)  # every class, exactly
                sampled = None
                counts = [1] * len(rows)
            else:
                counts = [len(r.positions) for r in rows]
                b = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts))
                p = torch.from_numpy(np.concatenate([r.positions for r in rows]))
                e = torch.repeat_interleave(torch.tensor([r.example_id for r in rows], dtype=torch.long), torch.tensor(counts))
                if self.pin:
                    b, p, e = b.pin_memory(), p.pin_memory(), e.pin_memory()
                b, p, e = (t.to(self.device, non_blocking=True) for t in (b, p, e))
                ids, values, finite, sampled = self.device_targets(logits, b, p, e)
            del logits  # the full-vocabulary logits stay on the device and are freed here
            host = [t.to("cpu", non_blocking=self.pin) if t is not None else None for t in (ids, values, finite)]
            if sampled is not None:
                host.append([t.to("cpu", non_blocking=self.pin) for t in sampled])
        event = None
        if self.pin:
            event = torch.cuda.Event()
            event.record()
        return rows, counts, host, event

    @staticmethod
    def finish(pending) -> tuple[list, list[int]]:
        """[(row, topk_ids, topk_logprobs[, samples])] and the example ids whose outputs were not finite.

        samples (sampled kinds): (entries per position, ids, log-probs, counts), flat over the row's
        positions in order; topk_ids/topk_logprobs are None for the `sample` kind."""
        rows, counts, host, event = pending
        if event is not None:
            event.synchronize()
        ids, values, finite = (t.numpy() if t is not None else None for t in host[:3])
        samples = None
        if len(host) > 3:
            s_ids, s_lp, s_counts = (t.numpy() for t in host[3])
            present = s_counts > 0  # entries packed to the left, empty slots count 0
            lengths = present.sum(1)
            flat = (s_ids[present], s_lp[present], s_counts[present])
            entry_offsets = np.concatenate([[0], np.cumsum(lengths)])
        out, bad, start = [], [], 0
        for r, n in zip(rows, counts):
            stop = start + n
            result = (r, None if ids is None else ids[start:stop], None if values is None else values[start:stop])
            if len(host) > 3:
                a, b = entry_offsets[start], entry_offsets[stop]
                result += ((lengths[start:stop],) + tuple(f[a:b] for f in flat),)
            out.append(result)
            if not finite[start:stop].all():
                bad.append(r.example_id)
            start = stop
        return out, bad

    def __call__(self, rows) -> tuple[list, list[int]]:
        return self.finish(self.launch(rows))


# ---------------------------------------------------------------- main entry

def run_dump(opts: DumpOptions) -> DumpResult:
    dist = Dist()
    try:
        return _run(opts, dist)
    finally:
        dist.close()


def _run(opts: DumpOptions, dist: Dist) -> DumpResult:
    echo = opts.echo if dist.rank == 0 else (lambda *a, **kw: None)
    out = Path(opts.out).expanduser().absolute()
    device, dtype, teacher, corpus, task, k, packing, max_length = validate(opts, dist)
    batch_size = opts.batch_size
    max_tokens = opts.max_tokens_per_batch or (None if batch_size else DEFAULT_MAX_TOKENS_PER_BATCH)

    # Rank 0 tokenizes first so the others reuse datasets' cache instead of racing to write it.
    if dist.rank != 0:
        dist.barrier()
    tokenized = tokenize_corpus(corpus, teacher.tokenizer, task=task, max_length=max_length, packing=bool(packing),
                                label2id=getattr(teacher.config, "label2id", None), num_labels=teacher.target_vocab_size)
    if dist.rank == 0:
        dist.barrier()
    masking = MaskingRecipe(teacher.tokenizer, teacher.vocab_size, opts.mlm_probability, opts.seed) if task == "mlm" else None
    plan = RowPlan(tokenized, task=task, max_length=max_length, packing=bool(packing), shard_rows=opts.shard_rows,
                   masking=masking, mask_copies=opts.mask_copies)
    targets = {"kind": opts.targets, "k": k, "samples": opts.samples if S.has_samples(opts.targets) else 0}
    manifest = build_manifest(opts, teacher, corpus, task=task, k=k, dtype=dtype, max_length=max_length,
                              packing=packing, num_shards=plan.num_shards, targets=targets)
    arrow_schema = S.schema_for_manifest(manifest)

    if opts.dry_run:
        return dry_run(plan, manifest, arrow_schema, echo)

    error = None
    previous_run = {}
    if dist.rank == 0:
        try:
            clear = check_output_dir(out, manifest, opts.overwrite)
            if not clear and manifest_path(out).is_file():
                previous_run = read_manifest(out).get("dump") or {}  # earlier sessions of this same cache
            check_writable(out)
            if clear:
                clear_cache(out)
            remove_partial_files(out)
            # Manifest first: a run killed right after still leaves a directory recognised as this cache.
            atomic_write_json(manifest_path(out), with_shards(manifest, out))
            teacher.tokenizer.save_pretrained(out / S.TOKENIZER_DIR)
        except KdcacheError as e:
            error = str(e)
    dist.share_error(error)

    done = complete_shards(out)
    mine = [i for i in range(plan.num_shards) if i % dist.world == dist.rank and i not in done]
    if done and mine:
        echo(f"resuming: {len(done)} of {plan.num_shards} shards already complete")

    def on_written(stats):
        if dist.rank == 0:  # rank 0 owns the manifest; other ranks' sidecars are picked up too
            atomic_write_json(manifest_path(out), with_shards(manifest, out))

    runner = TeacherRunner(teacher, task, k, device, pad_id=teacher.tokenizer.pad_token_id or 0,
                           kind=targets["kind"], samples=targets["samples"], seed=opts.seed)
    writer = ShardWriter(out, arrow_schema, k, on_written=on_written, threads=writer_threads(device))
    total_tokens = sum(plan.shard_tokens(i) for i in mine)
    real, padded = 0, 0
    start = time.perf_counter()
    bar = make_bar(total_tokens, opts.progress, dist)
    try:
        for shard in mine:
            rows = plan.rows(shard)
            lengths = [len(r.input_ids) for r in rows]
            batches = make_batches(lengths, batch_size=batch_size, max_tokens=max_tokens)
            padded += padded_tokens(lengths, batches)
            results = []
            pending = None
            # One batch in flight: launch batch t+1 before collecting t (overlaps host work with the GPU).
            for batch in batches + [None]:
                launched = runner.launch([rows[i] for i in batch]) if batch is not None else None
                if pending is not None:
                    got, bad = runner.finish(pending)
                    if bad:
                        raise KdcacheError(
                            f"the teacher produced NaN/inf logits for example ids {', '.join(map(str, bad[:10]))}"
                            f"{' ...' if len(bad) > 10 else ''} (shard {shard}, dtype {dtype}); "
                            "fp16 overflows are common: re-run with --dtype bf16 or --dtype fp32 (completed shards are kept)")
                    results.extend(got)
                    n = sum(len(r.input_ids) for r in pending[0])
                    real += n
                    if bar is not None:
                        bar.update(n)
                pending = launched
            writer.submit(shard, results)
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start
    dist.barrier()

    run_info = {"seconds": round(seconds, 3), "tokens_per_second": round(real / seconds, 1) if seconds > 0 else None,
                "device": str(device), "world_size": dist.world, "real_tokens": real, "padded_tokens": padded,
                "padding_ratio": round(padded / real, 4) if real else None,
                "batch_size": batch_size, "max_tokens_per_batch": max_tokens}
    final = with_shards(manifest, out)
    final["dump"] = accumulate_runs(previous_run, run_info)
    if dist.rank == 0:
        atomic_write_json(manifest_path(out), final)
    summary = summarize(final, run_info, out)
    echo(summary)
    return DumpResult(final, final["totals"]["rows"], final["totals"]["positions"], plan.num_shards,
                      real, padded, seconds, summary)


def writer_threads(device: torch.device) -> int:
    """One shard writer on CPU (the teacher needs the cores); on a GPU the host only feeds it, and
    one writer thread would cap the dump at ~100k positions/s, so use a few."""
    if device.type == "cpu":
        return 1
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def accumulate_runs(previous: dict, current: dict) -> dict:
    """The manifest's `dump` record covers every session that built this cache: a resumed dump adds its
    time and tokens to the earlier ones, and a re-run that had nothing left to do changes nothing.
    (Under torchrun these are rank 0's figures.)"""
    if not previous.get("real_tokens"):
        return current
    if not current["real_tokens"]:
        return previous
    merged = dict(current)
    for key in ("seconds", "real_tokens", "padded_tokens"):
        merged[key] = round(previous.get(key, 0) + current[key], 3)
    merged["tokens_per_second"] = round(merged["real_tokens"] / merged["seconds"], 1) if merged["seconds"] > 0 else None
    merged["padding_ratio"] = round(merged["padded_tokens"] / merged["real_tokens"], 4)
    merged["sessions"] = previous.get("sessions", 1) + 1
    return merged


def make_bar(total: int, progress: bool, dist: Dist):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="tok", unit_scale=True, desc="dump-logits" if dist.world == 1 else f"dump-logits rank {dist.rank}",
                position=dist.rank, dynamic_ncols=True, smoothing=0.1)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def summarize(manifest: dict, run_info: dict, out: Path) -> str:
    t = manifest["totals"]
    per_pos = t["bytes"] / t["positions"] if t["positions"] else 0.0
    state = "complete" if manifest["complete"] else f"INCOMPLETE ({len(manifest['shards'])}/{manifest['num_shards']} shards; re-run to finish)"
    return (f"Wrote {t['rows']:,} rows with {t['positions']:,} target positions ({S.describe_targets(manifest)}, {manifest['task']}) "
            f"in {manifest['num_shards']} shards to {out}: {human_bytes(t['bytes'])} on disk, {per_pos:.1f} bytes per position; "
            f"this run processed {run_info['real_tokens']:,} tokens in {run_info['seconds']:.1f} s "
            f"({run_info['tokens_per_second'] or 0:,.0f} tokens/s, padding ratio {run_info['padding_ratio'] or 1:.3f}); cache {state}.")


def dry_run(plan: RowPlan, manifest: dict, arrow_schema, echo) -> DumpResult:
    """Tokenize and mask everything, count, estimate size; the teacher never runs."""
    rows = positions = tokens = 0
    for shard in range(plan.num_shards):
        for r in plan.rows(shard):
            rows += 1
            positions += len(r.positions)
            tokens += len(r.input_ids)
    target_type = S.id_type(manifest["target_vocab_size"])
    id_bytes = target_type.bit_width // 8
    tok_bytes = arrow_schema.field(S.INPUT_IDS).type.value_type.bit_width // 8
    pos_bytes = arrow_schema.field(S.POSITIONS).type.value_type.bit_width // 8
    targets = S.targets_of(manifest)
    k, draws = targets["k"], targets["samples"]
    per_position = k * (id_bytes + 2) + pos_bytes + 4
    if draws:
        # Upper bound: every draw a distinct id (id + fp16 log-prob + count each), plus the entries per
        # position (sample_lengths). A confident teacher draws far fewer distinct ids.
        count_bytes = S.smallest_uint(draws).bit_width // 8
        per_position += min(draws, manifest["target_vocab_size"] - k) * (id_bytes + 2 + count_bytes) + count_bytes
    estimate = positions * per_position + tokens * tok_bytes + rows * 8
    bound = " at most" if draws else ""
    summary = (f"dry run: {rows:,} rows, {positions:,} target positions, {tokens:,} tokens in {plan.num_shards} shards; "
               f"estimated cache size{bound} {human_bytes(estimate)} before compression "
               f"({estimate / max(positions, 1):.0f} bytes per position{bound} at {S.describe_targets(manifest)}"
               f"{'; every draw counted as a distinct id' if draws else ''}; zstd usually saves a little on log-probs, "
               "more on ids); the teacher was not run.")
    echo(summary)
    return DumpResult(None, rows, positions, plan.num_shards, real_tokens=tokens, summary=summary,
                      extra={"estimated_bytes": estimate})
