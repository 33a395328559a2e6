"""What a dump reports: the progress bar, the closing summary, and the dry run's estimate."""
from __future__ import annotations

from pathlib import Path

from ..cache import schema as S
from ..distributed import ProcessGroup
from . import chat_spans
from .options import DumpResult
from .rows import RowPlan


def make_bar(total: int, progress: bool, dist: ProcessGroup):
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
            f"({run_info['tokens_per_second'] or 0:,.0f} tokens/s, padding ratio {run_info['padding_ratio'] or 1:.3f}); cache {state}."
            + (f"\n{chat}" if (chat := chat_spans.summary_line(manifest)) else ""))


def dry_run(plan: RowPlan, manifest: dict, arrow_schema, echo) -> DumpResult:
    """Tokenize and mask everything, count, estimate size; the teacher never runs."""
    targets = S.targets_of(manifest)
    fraction = targets["select_positions"]  # None, or soft targets at the selected positions only
    rows = positions = soft = tokens = 0
    for shard in range(plan.num_shards):
        shard_rows = plan.rows(shard)
        per_row = [len(r.positions) for r in shard_rows]
        rows += len(per_row)
        positions += sum(per_row)
        soft += int(S.selected_counts(fraction, per_row).sum())
        tokens += sum(len(r.input_ids) for r in shard_rows)
    target_type = S.id_type(manifest["target_vocab_size"])
    id_bytes = target_type.bit_width // 8
    tok_bytes = arrow_schema.field(S.INPUT_IDS).type.value_type.bit_width // 8
    pos_bytes = arrow_schema.field(S.POSITIONS).type.value_type.bit_width // 8
    draws = targets["samples"]
    options = {} if targets["draw_logprobs"] else {"draw_logprobs": False}  # only drawn kinds take it
    soft_bytes = S.kind_of(targets["kind"]).raw_bytes(targets["k"], draws, id_bytes, manifest["target_vocab_size"],
                                                      **options)
    # positions + int32 labels at every target (+ a soft_mask bool where selecting), soft targets where selected
    per_position = pos_bytes + 4 + (1 if fraction is not None else 0)
    estimate = positions * per_position + soft * soft_bytes + tokens * tok_bytes + rows * 8
    bound = " at most" if draws else ""
    selected = (f"; soft targets at {soft:,} of them (--select-positions {fraction})" if fraction is not None else "")
    summary = (f"dry run: {rows:,} rows, {positions:,} target positions{selected}, {tokens:,} tokens in {plan.num_shards} shards; "
               f"estimated cache size{bound} {human_bytes(estimate)} before compression "
               f"({estimate / max(positions, 1):.0f} bytes per position{bound} at {S.describe_targets(manifest)}"
               f"{'; every draw counted as a distinct id' if draws else ''}; zstd usually saves a little on log-probs, "
               "more on ids); the teacher was not run.")
    if chat := chat_spans.summary_line(manifest):
        summary += f"\n{chat}"
    echo(summary)
    return DumpResult(None, rows, positions, plan.num_shards, real_tokens=tokens, summary=summary,
                      extra={"estimated_bytes": estimate})
