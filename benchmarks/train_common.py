"""Shared set-up for the stage-two benchmarks (benchmarks/train_*.py): tokenizers trained on the
bundled Tiny Shakespeare, randomly initialised teachers of a chosen size, real caches from
`kdcache dump-logits`, and synthetic caches of any size for the loader/memory benchmarks.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def lines() -> list[str]:
    return [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]


def wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(lines(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def byte_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=2048)


def make_teacher(task: str, path: Path, *, vocab_size: int, layers: int, hidden: int) -> Path:
    """A randomly initialised BERT (mlm) or Llama (clm) teacher with its tokenizer, saved to `path`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    heads, inter = max(1, hidden // 64), 4 * hidden
    if task == "mlm":
        tok = wordpiece(vocab_size)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                           num_attention_heads=heads, intermediate_size=inter,
                                           max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    else:
        tok = byte_bpe(vocab_size)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=heads,
                                             intermediate_size=inter, max_position_embeddings=2048,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def kdcache(*args) -> None:
    """`kdcache ARGS` in this process (raises on failure)."""
    from kdcache.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"kdcache {' '.join(map(str, args))} exited {e.code}")


def dump(teacher: Path, out: Path, *, k: int, max_length: int, limit: int | None = None) -> Path:
    if not (out / "manifest.json").is_file():
        corpus = out.parent / "corpus.txt"
        if not corpus.is_file():
            corpus.write_text("\n".join(lines()) + "\n")
        kdcache("dump-logits", "--teacher", teacher, "--data", corpus, "--out", out, "--top-k", k,
                "--max-length", max_length, "--no-progress", *(["--limit", limit] if limit else []))
    return out


def synthetic_cache(out: Path, *, rows: int, length: int, k: int, vocab_size: int, task: str = "clm",
                    shard_rows: int = 4096, seed: int = 0) -> Path:
    """A cache of `rows` random rows (CLM: every position a target; MLM: 15%), written with
    the same schema/writer as dump-logits, so its bytes per position are realistic."""
    import numpy as np
    import pyarrow as pa

    from kdcache.cache.files import atomic_write_json
    from kdcache.cache.schema import FORMAT_VERSION, arrow_schema
    from kdcache.cache.shards import write_shard

    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    schema = arrow_schema(k=k, vocab_size=vocab_size, max_length=length)
    n_pos = length if task == "clm" else max(1, round(0.15 * length))
    shards = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        ids = rng.integers(0, vocab_size, (n, length))
        positions = np.tile(np.arange(n_pos), (n, 1)) if task == "clm" else np.sort(
            rng.random((n, length)).argsort(1)[:, :n_pos], 1)
        topk = rng.integers(0, vocab_size, (n * n_pos, k))
        logprobs = np.sort(-rng.gamma(2.0, 2.0, (n * n_pos, k)), 1)[:, ::-1].astype(np.float16)

        def nested(flat, inner_type, width):
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), inner_type), width)
            return pa.ListArray.from_arrays(pa.array(np.arange(0, n * n_pos + 1, n_pos, dtype=np.int32)), inner)

        table = pa.table({
            "example_id": pa.array(np.arange(start, start + n), pa.int64()),
            "input_ids": pa.ListArray.from_arrays(pa.array(np.arange(0, n * length + 1, length, dtype=np.int32)),
                                                  pa.array(ids.reshape(-1), schema.field("input_ids").type.value_type)),
            "positions": pa.ListArray.from_arrays(pa.array(np.arange(0, n * n_pos + 1, n_pos, dtype=np.int32)),
                                                  pa.array(positions.reshape(-1), schema.field("positions").type.value_type)),
            "topk_ids": nested(topk, schema.field("topk_ids").type.value_type.value_type, k),
            "topk_logprobs": nested(logprobs, pa.float16(), k),
            "labels": pa.ListArray.from_arrays(pa.array(np.arange(0, n * n_pos + 1, n_pos, dtype=np.int32)),
                                               pa.array(rng.integers(0, vocab_size, n * n_pos).astype(np.int32))),
        }).cast(schema)
        shards.append(write_shard(out, index, table))
    atomic_write_json(out / "manifest.json", {
        "format_version": FORMAT_VERSION, "kdcache_version": "bench", "task": task, "k": k, "vocab_size": vocab_size,
        "target_vocab_size": vocab_size, "num_labels": None, "id2label": None, "dtype": "fp32", "max_length": length,
        "packing": True, "mlm_probability": 0.15 if task == "mlm" else None, "mask_copies": None, "seed": seed,
        "shard_rows": shard_rows, "token_type_ids": False, "special_token_ids": {"pad": 0},
        "teacher": {"source": "synthetic", "model_type": "llama" if task == "clm" else "bert"},
        "tokenizer": {"sha256": "none", "dir": "tokenizer"}, "data": {"source": "synthetic"},
        "complete": True, "num_shards": len(shards), "shards": shards,
        "totals": {"rows": rows, "positions": sum(s["positions"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards)}, "dump": {}})
    return out


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                 else sys.argv[0]] + sys.argv[1:])


def print_ratio_table(rates: dict[str, list[float]], base_name: str) -> None:
    """The rows of a Markdown table under a header the caller printed: each entry's median rate and its
    ratio to base_name's median (the runs were side by side, so only the ratio is meaningful)."""
    base = statistics.median(rates[base_name])
    print("|---|---:|---:|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f}x |")


def print_layout_rows(paths: dict[str, Path], cpu_seconds: dict[str, list[float]], positions: int,
                      base_name: str) -> None:
    """The rows of a file-layout table under the caller's header: each file's size, positions decoded per
    CPU-second (median of its rounds) and that rate over base_name's."""
    base = positions / statistics.median(cpu_seconds[base_name])
    for name, path in paths.items():
        rate = positions / statistics.median(cpu_seconds[name])
        print(f"| {name} | {path.stat().st_size / 2**20:,.2f} | {rate:,.0f} | {rate / base:.2f} |")
