"""`dump-logits` options, and every check on them made before anything is written."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import schema as S
from .. import distributed
from ..distributed import ProcessGroup
from ..errors import KdcacheError
from .chat import report_problems
from .chat_spans import ASSISTANT, TARGETS_ON, resolve_template
from .corpus import load_corpus
from .teacher import load_model, load_teacher

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_TOKENS_PER_BATCH = 8192
# Target defaults, from the quality tables (BENCHMARKS.md, benchmarks/quality.md): for LM teachers the exact
# top-8 plus 16 draws from the rest trains students closest to online KD per byte, at 1, 3 and 10 epochs;
# top-k alone is biased (it drops the tail) and needs 64+ ids to come near. Classifiers store every class.
DEFAULT_LM_TARGETS = S.TOP_K_SAMPLE
DEFAULT_HEAD = 8        # --top-k of top-k+sample
DEFAULT_TOP_K = 64      # --top-k of top-k
# Draws per position for the sampled target kinds (Anshumann et al. 2025 report near-full-KD
# quality at ~12 unique tokens per position; 16 draws give ~6-12 distinct ids on an LM teacher).
DEFAULT_SAMPLES = 16


@dataclass
class DumpOptions:
    teacher: str
    data: str
    out: str | Path  # a local folder, or an s3:// (gs://, hdfs://) prefix
    task: str | None = None
    split: str = "train"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = None
    max_length: int | None = None
    packing: bool | None = None
    mlm_probability: float = 0.15
    mask_copies: int = 1
    # None: the default for the teacher (resolve_targets): top-k+sample 8 + 16 for LMs, every class for classifiers
    top_k: int | None = None
    targets: str | None = None
    samples: int | None = None
    draw_logprobs: bool = True  # False: drawn kinds store counts without log-probs (format v3)
    select_positions: float | None = None  # soft targets at this fraction of each row's targets (None: all)
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
    # Chat corpora (kdcache.dump.chat, chat_spans): column, template file, which tokens are targets.
    messages_column: str | None = None
    chat_template: str | None = None
    targets_on: str | None = None
    strict: bool = False


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


def resolve_device(device: str, dist: ProcessGroup) -> torch.device:
    """--device for this rank: under torchrun a bare `cuda` means this rank's local GPU."""
    return distributed.resolve_device(device, dist.local_rank, dist.world)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return dtype


def validate(opts: DumpOptions, dist: ProcessGroup):
    """Everything that can be wrong with the inputs, checked before anything is written."""
    if opts.targets is not None and opts.targets not in S.TARGET_KINDS:
        raise KdcacheError(f"--targets {opts.targets!r} is not a target kind; use one of {', '.join(S.TARGET_KINDS)}")
    if opts.top_k is not None and opts.top_k < 1:
        raise KdcacheError(f"--top-k must be >= 1, got {opts.top_k}")
    if opts.samples is not None and not 1 <= opts.samples <= 65535:
        raise KdcacheError(f"--samples must be within 1..65535, got {opts.samples}")
    if opts.select_positions is not None:
        check_select_positions(opts.select_positions)
    if opts.shard_rows < 1:
        raise KdcacheError(f"--shard-rows must be >= 1, got {opts.shard_rows}")
    if opts.mask_copies < 1:
        raise KdcacheError(f"--mask-copies must be >= 1, got {opts.mask_copies}")
    if not 0 < opts.mlm_probability < 1:
        raise KdcacheError(f"--mlm-probability must be in (0, 1), got {opts.mlm_probability}")
    if opts.limit is not None and opts.limit < 1:
        raise KdcacheError(f"--limit must be >= 1, got {opts.limit}")
    if opts.messages_column and (opts.label_column or opts.text_pair_column):
        # A chat corpus has no labels or pairs: left unrefused, the corpus would be read as plain text.
        option = "--label-column" if opts.label_column else "--text-pair-column"
        raise KdcacheError(f"--messages-column cannot be combined with {option}: conversations are distilled from a "
                           f"causal-LM teacher, which takes no labels or text pairs; drop {option}, or drop "
                           "--messages-column for a classification corpus")
    # Explicit zeros are mistakes, not "use the default" (`or` below would swallow them).
    for option, value, least in (("--max-length", opts.max_length, 2), ("--batch-size", opts.batch_size, 1),
                                 ("--max-tokens-per-batch", opts.max_tokens_per_batch, 1)):
        if value is not None and value < least:
            raise KdcacheError(f"{option} must be >= {least}, got {value}; leave it out for the default")
    device = resolve_device(opts.device, dist)
    dtype = resolve_dtype(opts.dtype, device)
    teacher = load_teacher(opts.teacher, task=opts.task, trust_remote_code=opts.trust_remote_code, load_weights=False)
    task = teacher.task
    resolve_targets(opts, task)
    kind = S.kind_of(opts.targets)
    if task == "seq-cls":
        if opts.select_positions is not None:
            raise KdcacheError("--select-positions picks positions within a row, and a sequence-classification row "
                               "has one target: drop --select-positions for --task seq-cls")
        k = teacher.target_vocab_size  # the whole label set: classification targets are tiny
        packing = None
    else:
        if opts.top_k > teacher.target_vocab_size:
            raise KdcacheError(f"--top-k {opts.top_k} exceeds the teacher's vocabulary of {teacher.target_vocab_size}; "
                               f"pass --top-k {teacher.target_vocab_size} or less")
        k = opts.top_k if kind.head else 0
        if kind.head and kind.draws and k >= teacher.target_vocab_size:
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
                         text_pair_column=opts.text_pair_column, label_column=opts.label_column, limit=opts.limit,
                         messages_column=opts.messages_column)
    if corpus.chat is not None:
        packing = check_chat(opts, dist, teacher, task, corpus)
    elif opts.chat_template or opts.targets_on:
        raise KdcacheError(f"{'--chat-template' if opts.chat_template else '--targets-on'} is for chat corpora, but --data "
                           f"{opts.data} has a {opts.text_column!r} column and no messages/conversations/instruction "
                           "column; drop the option, or point --data at conversations")
    if not opts.dry_run:
        load_model(teacher, dtype=DTYPES[dtype], device=device)
        if task != "seq-cls" and k > teacher.target_vocab_size:
            raise KdcacheError(f"--top-k {k} exceeds the teacher's output size {teacher.target_vocab_size}")
    return device, dtype, teacher, corpus, task, k, packing, max_length


def resolve_targets(opts: DumpOptions, task: str) -> None:
    """Fill the target options left out (None) with the teacher's defaults; refuse those the kind would ignore."""
    if task == "seq-cls":
        if opts.targets not in (None, S.TOP_K) or opts.samples is not None or opts.top_k is not None \
                or not opts.draw_logprobs:
            given = f"--targets {opts.targets}" if opts.targets not in (None, S.TOP_K) else \
                ("--samples" if opts.samples is not None else "--top-k" if opts.top_k is not None else "--no-draw-logprobs")
            raise KdcacheError(f"{given} is for LM teachers; a sequence-classification cache already stores every "
                               f"class exactly: drop {given.split()[0]}")
        opts.targets = S.TOP_K
        return
    opts.targets = opts.targets or DEFAULT_LM_TARGETS
    kind = S.kind_of(opts.targets)
    # A --samples or --top-k the chosen kind does not use would be silently ignored: the user meant another cache.
    if not kind.draws and opts.samples is not None:
        raise KdcacheError(f"--samples sets the draws of --targets sample or top-k+sample; --targets {opts.targets} "
                           "stores no draws: drop --samples, or pass --targets top-k+sample (or sample)")
    if not opts.draw_logprobs and not kind.draws:
        raise KdcacheError(f"--no-draw-logprobs drops the log-probs of drawn ids; --targets {opts.targets} stores no "
                           "draws: drop --no-draw-logprobs, or pass --targets sample or top-k+sample")
    if not kind.head and opts.top_k is not None:
        raise KdcacheError(f"--top-k sets the exact head of --targets top-k or top-k+sample; --targets {opts.targets} "
                           "stores draws only: drop --top-k, or pass --targets top-k+sample")
    if opts.top_k is None:
        opts.top_k = (DEFAULT_HEAD if kind.draws else DEFAULT_TOP_K) if kind.head else 0
    if opts.samples is None:
        opts.samples = DEFAULT_SAMPLES if kind.draws else 0
def check_select_positions(fraction: float) -> None:
    """0 < FRACTION <= 1, with at most 6 decimals (the per-row count is exact decimal arithmetic)."""
    from fractions import Fraction

    if not 0 < fraction <= 1:
        raise KdcacheError(f"--select-positions must be in (0, 1], got {fraction}; e.g. 0.2 keeps soft targets "
                           "at the 20 % highest-entropy positions of each row")
    if Fraction(repr(float(fraction))).denominator > 10**6:
        raise KdcacheError(f"--select-positions {fraction} has more than 6 decimals; round it (e.g. "
                           f"{round(fraction, 6)})")


def check_chat(opts: DumpOptions, dist: ProcessGroup, teacher, task: str, corpus) -> bool:
    """Checks for a chat corpus; says what was detected and which rows are skipped. Returns packing (off)."""
    echo = opts.echo if dist.rank == 0 else (lambda *a, **kw: None)
    if task != "clm":
        raise KdcacheError(f"--data {opts.data} holds conversations, which need a causal-LM (chat) teacher; the teacher "
                           f"is a {task} model: pass a decoder teacher, or --text-column for plain text")
    if opts.packing:
        raise KdcacheError("--packing is not offered for chat corpora (one conversation per row, so no conversation "
                           "attends to another); drop --packing")
    targets_on = opts.targets_on or ASSISTANT
    if targets_on not in TARGETS_ON:
        raise KdcacheError(f"--targets-on {targets_on!r} is not one of {', '.join(TARGETS_ON)}")
    corpus.chat["template"] = resolve_template(teacher.tokenizer, opts.chat_template)
    corpus.chat["targets_on"] = targets_on
    echo(corpus.chat["detected"])
    report_problems(corpus.bad_rows, corpus.description["num_source_examples"], "are not usable conversations",
                    strict=opts.strict, echo=echo, noun="rows")
    if corpus.description["num_nonempty_examples"] == 0:
        raise KdcacheError(f"--data {opts.data} has no usable conversation (all {corpus.description['num_source_examples']} "
                           "rows are bad, see above); fix the rows or point --data elsewhere")
    return False
