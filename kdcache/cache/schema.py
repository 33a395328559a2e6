"""The one place that knows the cache's Parquet schema (docs/FORMAT.md is its prose twin).

Stage one builds rows with `arrow_schema`; stage two and `verify` check shards against it.
"""
from __future__ import annotations

import pyarrow as pa

# Re-exported: the kinds' own columns and the integer types they share (kdcache/cache/kinds/).
from .kinds import KINDS, id_type, kind_of, smallest_uint  # noqa: F401
from .kinds.sample import NAME as SAMPLE, SAMPLE_COUNTS, SAMPLE_IDS, SAMPLE_LENGTHS, SAMPLE_LOGPROBS  # noqa: F401
from .kinds.topk import NAME as TOP_K, TOPK_IDS, TOPK_LOGPROBS  # noqa: F401
from .kinds.topk_sample import NAME as TOP_K_SAMPLE  # noqa: F401

FORMAT_VERSION = 2  # what a cache using no version-3 feature is written as (byte-identical to before v3)
# Versions every reader (train, evaluate, inspect, verify, sweep) loads. Version 1 is a top-k cache
# without the manifest's `targets` key and the sampled columns; its shards are byte-compatible.
# Version 3: a v2 cache plus a feature older readers would misread (see format_version_for).
READABLE_FORMAT_VERSIONS = (1, 2, 3)

TASKS = ("mlm", "clm", "seq-cls")

# Required columns, in file order.
EXAMPLE_ID = "example_id"
INPUT_IDS = "input_ids"
POSITIONS = "positions"
# (here the target kind's own columns: topk_ids ... sample_counts, defined in kdcache/cache/kinds/)
LABELS = "labels"
# Optional column: written only for sentence-pair classification (BERT segment ids).
TOKEN_TYPE_IDS = "token_type_ids"
# Optional column (format v3, `dump-logits --select-positions`): one bool per target position, True where
# the position has soft targets; the kind's columns then hold entries for the True positions only.
SOFT_MASK = "soft_mask"
# The selection criterion recorded in the manifest's targets (part of the cache identity).
SELECT_BY_ENTROPY = "entropy"

# Columns of every cache, whatever its target kind (soft_target_columns adds the kind's own).
REQUIRED_COLUMNS = (EXAMPLE_ID, INPUT_IDS, POSITIONS, LABELS)

# Target kinds (manifest["targets"]["kind"]): which soft-target columns a cache has, and everything
# else kind-specific, live in kdcache/cache/kinds/ (one module per kind, one registry).
TARGET_KINDS = tuple(KINDS)  # the built-in kinds, as `dump-logits --targets` offers them

UNKNOWN_LABEL = -1

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# What stage two needs of the teacher (its config.json), so a cache works without the teacher.
TEACHER_CONFIG = "teacher/config.json"
# Shards live alone in data/, so `pandas.read_parquet("CACHE/data")` and
# `pyarrow.dataset.dataset("CACHE/data")` work as they are.
SHARD_DIR = "data"
SHARD_PATTERN = "part-{index:05d}.parquet"
# A shard's stats sidecar: written after the shard is renamed into place, so its presence
# means "this shard is complete". Lets any rank (or a resumed run) rebuild the manifest.
# The leading underscore makes Parquet readers (pyarrow, pandas, datasets) skip it.
SHARD_STATS_PATTERN = "_part-{index:05d}.stats.json"

PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 3
# Parquet encoding of the soft-target columns (every registered kind's `columns`; the others stay PLAIN).
# Byte-stream-split stores the values' first bytes together, then their second bytes, ..., which zstd
# compresses better and faster: on a real teacher's caches 11-15 % fewer bytes per position, encoding and
# decoding no slower (benchmarks/column_costs.py, BENCHMARKS.md). The columns' types and values are unchanged;
# reading needs Parquet's BYTE_STREAM_SPLIT for FIXED_LEN_BYTE_ARRAY and INT32 (format 2.11: pyarrow >= 16).
# Shards written before are PLAIN and read as before.
# Rows per row group: the unit stage two shuffles and partitions; small enough to stream.
DEFAULT_ROW_GROUP_ROWS = 256


def format_version_for(targets: dict) -> int:
    """The format version a cache with these manifest `targets` is written as: 3 if it uses a v3 feature
    (older readers would misread it, so they must refuse it), else 2, so that every other cache stays
    byte-identical to what v2 wrote and readable by older kdcache. v3 features: "select_positions" (soft
    columns hold only the selected positions) and "draw_logprobs": false (no sample_logprobs)."""
    uses_v3 = targets.get("select_positions") is not None or targets.get("draw_logprobs", True) is False
    return 3 if uses_v3 else FORMAT_VERSION


def targets_of(manifest: dict) -> dict:
    """{kind, k, samples, draw_logprobs, select_positions} of a cache; a v1 manifest (no `targets`) is a
    top-k cache of width `k`. draw_logprobs: whether drawn entries carry the teacher's log-prob (absent =
    true); select_positions: the fraction of each row's targets with soft targets (None: all)."""
    targets = manifest.get("targets")
    if targets is None:
        return {"kind": TOP_K, "k": int(manifest["k"]), "samples": 0, "draw_logprobs": True, "select_positions": None}
    select = targets.get("select_positions")
    return {"kind": targets["kind"], "k": int(targets["k"]), "samples": int(targets["samples"]),
            "draw_logprobs": targets.get("draw_logprobs", True) is not False,
            "select_positions": None if select is None else float(select)}


def selected_counts(fraction: float | None, targets_per_row):
    """Soft-target positions per row under --select-positions: ceil(fraction × targets in the row), with
    the fraction read as the decimal the manifest writes (0.7 is 7/10, so 0.7 × 10 keeps exactly 7;
    float arithmetic would keep 8). Every row with a target keeps at least one. None: all of them."""
    import numpy as np
    from fractions import Fraction

    n = np.asarray(targets_per_row, dtype=np.int64)
    if fraction is None:
        return n
    exact = Fraction(repr(float(fraction)))
    if exact.denominator > 2**20:  # many decimals (dump-logits refuses them): Python ints cannot overflow
        return np.array([-(-int(x) * exact.numerator // exact.denominator) for x in n], dtype=np.int64)
    return -(-n * exact.numerator // exact.denominator)  # integer ceil: no float rounding


def describe_targets(manifest: dict) -> str:
    """"top-64", "16 samples", "top-8 + 16 samples"; ", counts only" without draw log-probs; a selected
    cache adds "at 20 % of positions"."""
    targets = targets_of(manifest)
    text = kind_of(targets["kind"]).describe(targets["k"], targets["samples"])
    if not targets["draw_logprobs"]:
        text += ", counts only"
    if targets["select_positions"] is not None:
        text += f" at {targets['select_positions'] * 100:g} % of positions"
    return text


def soft_target_columns(kind: str) -> tuple[str, ...]:
    return kind_of(kind).columns


def arrow_schema(
    *, k: int, vocab_size: int, max_length: int, target_vocab_size: int | None = None,
    with_token_type_ids: bool = False, kind: str = TOP_K, samples: int = 0, format_version: int = FORMAT_VERSION,
    draw_logprobs: bool = True,
    soft_mask: bool = False,
) -> pa.Schema:
    """Schema of every shard of one cache.

    kind/samples: the target kind and draws per position (sampled kinds); the kind's own fields
    (kdcache/cache/kinds/) sit between positions and labels. draw_logprobs=False (format v3): without
    the kind's `draw_logprob_columns`.
    soft_mask: a selected cache (format v3): soft_mask sits after positions, and the kind's fields
    hold entries for the selected positions only.

    vocab_size: the tokenizer's vocabulary (input_ids).
    target_vocab_size: the size of the teacher's output space (topk_ids): the vocabulary for
    LM tasks, the number of labels for seq-cls. Defaults to vocab_size.
    """
    if target_vocab_size is None:
        target_vocab_size = vocab_size
    token = id_type(vocab_size)
    target = id_type(target_vocab_size)
    position = smallest_uint(max(max_length - 1, 0))
    fields = [
        pa.field(EXAMPLE_ID, pa.int64(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(token), nullable=False),
        pa.field(POSITIONS, pa.list_(position), nullable=False),
    ]
    if soft_mask:
        fields.append(pa.field(SOFT_MASK, pa.list_(pa.bool_()), nullable=False))
    stored = kind_of(kind).stored_columns(draw_logprobs)
    fields += [f for f in kind_of(kind).fields(k=k, samples=samples, target=target) if f.name in stored]
    fields.append(pa.field(LABELS, pa.list_(pa.int32()), nullable=False))
    if with_token_type_ids:
        fields.append(pa.field(TOKEN_TYPE_IDS, pa.list_(pa.uint8()), nullable=False))
    return pa.schema(fields, metadata={b"kdcache_format_version": str(format_version).encode()})


def parquet_path(field: pa.Field) -> str:
    """The Parquet column path of a (nested) list column, as pyarrow writes it (e.g.
    `topk_ids.list.element.list.element`): what writer options such as column_encoding name."""
    path, typ = [field.name], field.type
    while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ):
        path += ["list", "element"]
        typ = typ.value_type
    return ".".join(path)


def column_encodings(schema: pa.Schema) -> dict[str, str]:
    """The shard writer's `column_encoding` for a cache schema: byte-stream-split for the soft-target columns
    (those some registered kind owns; see the comment at PARQUET_COMPRESSION)."""
    soft_target_columns = {name for kind in KINDS.values() for name in kind.columns}
    return {parquet_path(field): "BYTE_STREAM_SPLIT" for field in schema if field.name in soft_target_columns}


def schema_for_manifest(manifest: dict) -> pa.Schema:
    """The schema a cache's shards must have, derived from its manifest."""
    targets = targets_of(manifest)
    return arrow_schema(
        k=targets["k"], kind=targets["kind"], samples=targets["samples"], draw_logprobs=targets["draw_logprobs"],
        format_version=manifest.get("format_version", FORMAT_VERSION),
        vocab_size=manifest["vocab_size"],
        max_length=manifest["max_length"],
        target_vocab_size=manifest.get("target_vocab_size", manifest["vocab_size"]),
        with_token_type_ids=manifest.get("token_type_ids", False),
        soft_mask=targets["select_positions"] is not None,
    )


def shard_name(index: int) -> str:
    """Shard file path relative to the cache directory."""
    return f"{SHARD_DIR}/{SHARD_PATTERN.format(index=index)}"


def shard_stats_name(index: int) -> str:
    return f"{SHARD_DIR}/{SHARD_STATS_PATTERN.format(index=index)}"
