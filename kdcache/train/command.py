"""`kdcache train-student`: the CLI face of kdcache.train.loop."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import KdcacheError

EPILOG = """\b
Examples:
  kdcache train-student --cache cache/ --student L4-H256 --out students/l4 --epochs 3
  kdcache train-student --cache cache/ --student L6-H768 --init-from-teacher --out s6 --max-steps 2000
  torchrun --nproc_per_node 4 -m kdcache train-student --cache cache/ --student L4-H512 --out s --epochs 1
  kdcache train-student ... --resume          # continue an interrupted run exactly
"""


@click.command("train-student", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cache", "cache", required=True, type=click.Path(),
              help="Cache directory written by `kdcache dump-logits`, or its s3:// (gs://, hdfs://) URI.")
@click.option("--student", required=True,
              help="Size preset L{2,4,6,8,10,12}-H{128,256,512,768} in the teacher's architecture family "
                   "(e.g. L4-H256), a config.json, or a model directory to continue from.")
@click.option("--out", required=True, type=click.Path(),
              help="Output directory: the final student (save_pretrained + tokenizer), checkpoints, metrics.jsonl, "
                   "train_summary.json; or an s3:// (gs://, hdfs://) prefix, written as whole objects (one process).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps to train for.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the cache (fractions allowed); converted to a step count that is the same on "
                   "every rank. Default 1 when --max-steps is not given.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Sequences per micro-batch per process.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--warmup-steps", type=click.IntRange(min=0), help="Linear warm-up steps [default: 6% of the steps].")
@click.option("--scheduler", default="linear", show_default=True, type=click.Choice(["linear", "cosine", "constant_with_warmup"]),
              help="Decay after warm-up (transformers.get_scheduler).")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping; 0 disables.")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Distillation temperature T (the KD term is scaled by T²). Sampled caches are exact at T = 1; "
                   "at T != 1 they use self-normalised importance weights (consistent, bias ~1/N; docs/FORMAT.md), which "
                   "need the draws' log-probs (refused on a --no-draw-logprobs cache).")
@click.option("--alpha", default=0.5, show_default=True, type=float,
              help="Weight of the KD term; 1 - alpha weighs the hard-label loss. 0 = hard labels only "
                   "(the soft targets are then not even read).")
@click.option("--tail", default="renorm", show_default=True, type=click.Choice(["renorm", "bucket"]),
              help="Teacher mass outside the stored top-k: renormalise over k, or keep it as one 'rest' bucket "
                   "(top-k caches only: sampled caches estimate the tail without bias).")
@click.option("--selection-weighting", default="kd-share", show_default=True,
              type=click.Choice(["kd-share", "per-position", "selected-only"]),
              help="A selected cache's loss (dump-logits --select-positions): kd-share = alpha * KD averaged over the "
                   "selected positions + (1 - alpha) * CE averaged over all; per-position = alpha * KD + (1 - alpha) * CE "
                   "where selected, CE alone elsewhere; selected-only = the selected positions' loss alone. Ignored "
                   "on other caches. Held-out figures: benchmarks/quality.md.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the student's weights and the data order.")
@click.option("--layers", type=click.IntRange(min=1), help="Override the student's number of layers.")
@click.option("--hidden", type=click.IntRange(min=1), help="Override the student's hidden size.")
@click.option("--heads", type=click.IntRange(min=1), help="Override the student's attention heads.")
@click.option("--intermediate", type=click.IntRange(min=1), help="Override the student's feed-forward size.")
@click.option("--init-from-teacher", is_flag=True,
              help="DistilBERT initialisation: copy the teacher's embeddings and evenly spaced layers "
                   "(needs equal hidden sizes).")
@click.option("--teacher", type=click.Path(path_type=Path),
              help="Teacher model directory for --init-from-teacher if the manifest's path is not reachable (presets use "
                   "the config stored in the cache; this overrides it).")
@click.option("--online-teacher", type=click.Path(path_type=Path),
              help="Online KD baseline: soft targets from a live forward of this teacher (full softmax) at the "
                   "cache's positions, instead of the cached top-k.")
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Checkpoint every N steps (0: only when a session ends early).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (exactly).")
@click.option("--stop-after-steps", type=click.IntRange(min=1),
              help="End this session after N steps with a checkpoint (for job time limits); --resume continues.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Autocast on CUDA (auto: bf16 where supported, else fp16). CPU trains in fp32.")
@click.option("--num-workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes decoding the cache.")
@click.option("--shuffle-buffer", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Rows shuffled together within a worker (with the row-group order shuffled too); "
                   "bounds the loader's memory.")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Steps between metrics.jsonl lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the train summary as JSON at the end.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (metrics.jsonl is still written).")
def train_student(**opts):
    """Stage two: train a student of any size by streaming a cache's soft targets.

    Loss: alpha * T² * KL(teacher at T || student at T) + (1 - alpha) * CE(hard labels), the teacher
    being the cache's soft targets: its top-k renormalised, or (sampled caches) the weighted draws,
    whose expected gradient is full-softmax KD's.
    Launch with torchrun for DDP: each rank streams its own part of the cache.
    """
    from ..progress import hide_library_progress_bars
    from .loop import TrainConfig, train
    from .students import Sizes

    as_json = opts.pop("as_json")
    opts["progress"] = not opts.pop("no_progress")
    if not opts["progress"]:
        hide_library_progress_bars()
    sizes = Sizes(opts.pop("layers"), opts.pop("hidden"), opts.pop("heads"), opts.pop("intermediate"))
    for key in ("lr", "temperature"):
        if opts[key] <= 0:
            raise KdcacheError(f"--{key} must be > 0, got {opts[key]}")
    from ..cache.storage import is_remote
    if is_remote(opts["out"]):  # staged locally, mirrored into the bucket (kdcache.train.bucket_out)
        from .bucket_out import train_into_bucket
        summary = train_into_bucket(opts["out"], opts["cache"],
                                    lambda staging: train(TrainConfig(sizes=sizes, **{**opts, "out": staging})))
    else:
        summary = train(TrainConfig(sizes=sizes, **{**opts, "out": Path(opts["out"])}))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        click.echo(json.dumps(summary))
    elif summary.get("done"):
        rate = summary.get("tokens_per_second") or 0
        click.echo(f"trained {summary['student']['spec']} ({summary['num_parameters']:,} parameters) for "
                   f"{summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.1f}s "
                   f"({rate:,.0f} tokens/s); saved to {opts['out']}", err=True)
    else:
        where = f"{opts['out']}/checkpoints/" if is_remote(opts["out"]) else f"{opts['out']}/checkpoint"
        click.echo(f"stopped at step {summary['steps']} of {summary['total_steps']}; checkpoint in "
                   f"{where}; continue with --resume", err=True)
