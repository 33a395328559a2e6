"""`kdcache dump-logits`: the click front end of kdcache.dump.run."""
from __future__ import annotations

from pathlib import Path

import click


BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"


@click.command("dump-logits", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--teacher", required=True, help="Model directory (save_pretrained), hub id, or .gguf file.")
@click.option("--data", default=str(BUNDLED_CORPUS) if BUNDLED_CORPUS.is_file() else None, required=not BUNDLED_CORPUS.is_file(),
              show_default="bundled Tiny Shakespeare",
              help="Hub dataset name, or local .txt/.jsonl/.json/.csv/.tsv/.parquet file, directory or glob.")
@click.option("--out", required=True,
              help="Cache directory to create or resume, or an s3:// (gs://, hdfs://) prefix in a bucket.")
@click.option("--task", type=click.Choice(["mlm", "clm", "seq-cls"]), default=None,
              help="Force the task; default: detected from the teacher's head.")
@click.option("--split", default="train", show_default=True, help="Dataset split to read.")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text (.txt: one line per example).")
@click.option("--text-pair-column", default=None, help="Second text column, for sentence-pair classification.")
@click.option("--label-column", default=None, help="Gold label column (seq-cls), kept as hard labels; names or ids.")
@click.option("--messages-column", default=None,
              help="Chat corpora: column of {role, content} messages (default 'messages'; ShareGPT 'conversations' and "
                   "instruction/input/output rows are detected too).")
@click.option("--chat-template", default=None, type=click.Path(dir_okay=False),
              help="Chat corpora: Jinja chat template file, for a teacher whose tokenizer has none (overrides its own).")
@click.option("--targets-on", type=click.Choice(["assistant", "all", "last-assistant"]), default=None,
              help="Chat corpora: cache targets for every assistant turn (default), the last one only, or all positions. "
                   "A target is a position whose next token is assistant content or its end-of-turn marker.")
@click.option("--strict", is_flag=True, help="Chat corpora: refuse bad or unalignable conversations instead of skipping "
                                             "them with a report.")
@click.option("--max-length", type=int, default=None, help="Tokens per row; default min(teacher limit, 512).")
@click.option("--packing/--no-packing", default=None,
              help="LM tasks: concatenate the corpus and cut max-length blocks (default), or truncate each example.")
@click.option("--mlm-probability", type=float, default=0.15, show_default=True, help="MLM: fraction of tokens masked.")
@click.option("--mask-copies", type=int, default=1, show_default=True, help="MLM: differently-masked views per sequence.")
# The registry's built-in kinds (kdcache/cache/kinds/), written out so that `--help` loads no Arrow;
# tests/test_kinds.py checks the two agree.
@click.option("--targets", type=click.Choice(["top-k", "sample", "top-k+sample"]), default=None,
              help="Soft targets per position: the exact top-k plus N draws from the rest (unbiased, lowest variance; "
                   "the default for LM teachers); N draws from the teacher's softmax stored as distinct ids with counts "
                   "(unbiased); or the k most probable ids (biased: drops the tail). Classifiers store every class. "
                   "How to choose for a disk budget: README, docs/FORMAT.md.")
@click.option("--top-k", "top_k", type=int, default=None,
              help="The exact head of top-k+sample [default: 8], or the ids kept per position by top-k [default: 64].")
@click.option("--samples", type=int, default=None,
              help="Draws per position for --targets sample and top-k+sample (with replacement, at T = 1) [default: 16].")
@click.option("--draw-logprobs/--no-draw-logprobs", default=True, show_default=True,
              help="--targets sample and top-k+sample: store each drawn id's teacher log-prob (default), or only its "
                   "count (format v3; 25-40 % fewer bytes on an LM teacher): trains identically at --temperature 1, but T != 1 and "
                   "evaluate's KL need the log-probs.")
@click.option("--select-positions", "select_positions", type=float, default=None, metavar="FRACTION",
              help="Soft targets only at this fraction of each row's targets, those where the teacher's entropy is "
                   "highest (ceil per row); hard labels elsewhere. Writes format version 3. Default: every target.")
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True,
              help="Teacher precision; auto = fp16 on CUDA, fp32 on CPU. Log-softmax is always fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=None, help="Max rows per forward pass.")
@click.option("--max-tokens-per-batch", type=int, default=None,
              help="Max padded tokens per forward pass (default 8192 unless --batch-size is given).")
@click.option("--shard-rows", type=int, default=4096, show_default=True, help="Rows per Parquet shard (unit of resume).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the MLM masks and of the sampled targets' draws.")
@click.option("--limit", type=int, default=None, help="Use only the first N examples of the split.")
@click.option("--overwrite", is_flag=True, help="Replace a different cache in --out (after the inputs are validated).")
@click.option("--dry-run", is_flag=True, help="Tokenize and mask only; print rows, positions and estimated size.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher's own modelling code (only for models you trust).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def dump_logits(no_progress, **options):
    """Run TEACHER once over DATA and write its soft targets (top-k or sampled) to a sharded Parquet cache.

    \b
    Re-running the same command resumes after the last complete shard.
    Under torchrun, rank r dumps shards i with i % world_size == r.
    Example:
      kdcache dump-logits --teacher ./bert --data corpus.txt --out cache/          # top-8 + 16 draws per position
      kdcache dump-logits --teacher ./bert --data corpus.txt --out cache/ --targets top-k --top-k 32
      kdcache dump-logits --teacher ./llama --data corpus.txt --out cache/ --targets sample --samples 32
      kdcache dump-logits --teacher ./smollm2-instruct --data chats.jsonl --out chat-cache/   # assistant turns only
    """
    from ..progress import hide_library_progress_bars
    from .run import DumpOptions, run_dump

    if no_progress:
        hide_library_progress_bars()
    run_dump(DumpOptions(**options, progress=not no_progress, echo=click.echo))
