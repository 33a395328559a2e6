"""What storing top-k log-probs below float16 would cost in accuracy, against a direct fp32 forward.

Takes the top-64 cache column_costs.py dumped (SmolLM2-135M-Instruct on Tiny Shakespeare), runs the same
teacher again in float32 on its first --rows rows, and compares per position, for k = 8 and 64:

  tail mass    the teacher probability outside the top-k: what a top-k cache drops anyway (for scale)
  X            KL(top-k renormalised from fp32 log-probs || from log-probs stored as X), X one of
               float16 (today), e5m2 (float16 with its 8 low mantissa bits rounded off: one byte),
               uint8 at 1/16 or 1/8 nat steps (log-probs below -16 or -32 clamped)
  head mass    |sum of the k head probabilities, stored as X - from fp32| (top-k+sample weights the
               drawn tail by 1 - head mass)

and the bytes/position of the k log-probs stored as X (zstd 3, byte-stream-split where it applies).

    nice python benchmarks/logprob_quantisation.py [--rows 8] [--work DIR]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))


def e5m2(lp: np.ndarray) -> np.ndarray:
    """float16 rounded to 2 mantissa bits (the top byte of a float16: IEEE e5m2)."""
    bits = lp.astype(np.float16).view(np.uint16).astype(np.uint32)
    rounded = ((bits + 0x7F + ((bits >> 8) & 1)) >> 8) << 8  # round half to even on the dropped byte
    return rounded.astype(np.uint16).view(np.float16).astype(np.float32)


def uint8_steps(lp: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes, decoded): round(-lp / step) clamped to 0..255."""
    codes = np.clip(np.rint(-lp / step), 0, 255).astype(np.uint8)
    return codes, -codes.astype(np.float32) * step


def kl_rows(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of log-prob vectors (each renormalised over its row first)."""
    p_log = p_log - np.logaddexp.reduce(p_log, axis=1, keepdims=True)
    q_log = q_log - np.logaddexp.reduce(q_log, axis=1, keepdims=True)
    return (np.exp(p_log) * (p_log - q_log)).sum(1)


def column_bytes(values: np.ndarray, arrow_type: pa.DataType, positions: int, split: bool) -> float:
    k = values.shape[1]
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, 256, dtype=np.int32).tolist()
                                               + ([len(values)] if len(values) % 256 else [])),
                                      pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), arrow_type), k))
    table = pa.table({"lp": column})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3, use_dictionary=False,
                   column_encoding={"lp.list.element.list.element": "BYTE_STREAM_SPLIT"} if split else None)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    return sum(meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups)) / positions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-column-costs"))
    args = ap.parse_args()
    import torch
    from teachers import smollm2_teacher
    from transformers import AutoModelForCausalLM

    from train_common import command_line
    cache = Path(args.work) / "top-64"
    if not (cache / "manifest.json").is_file():
        sys.exit(f"no top-64 cache in {args.work}: run benchmarks/column_costs.py first")
    first = sorted((cache / "data").glob("part-*.parquet"))[0]
    table = pq.read_table(first).slice(0, args.rows)
    model = AutoModelForCausalLM.from_pretrained(smollm2_teacher(), dtype=torch.float32).eval()
    full, cached_lp, cached_ids = [], [], []
    with torch.no_grad():
        for row in table.to_pylist():
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1).numpy()
            full.append(logp[row["positions"]])
            cached_lp.append(np.array(row["topk_logprobs"], np.float32))
            cached_ids.append(np.array(row["topk_ids"]))
    full, cached_lp, cached_ids = np.concatenate(full), np.concatenate(cached_lp), np.concatenate(cached_ids)
    n = len(full)
    order = np.argsort(-full, axis=1)[:, :64]
    agree = float((order[:, :8] == cached_ids[:, :8]).mean())
    print(f"# {command_line()}")
    print(f"\n{n:,} positions ({args.rows} rows of the top-64 cache); the direct fp32 forward's top-8 ids equal "
          f"the cache's in {agree:.1%} of slots\n")
    print("| k | stored as | bytes/position (k log-probs) | mean KL(fp32 top-k ‖ stored top-k), nats "
          "| p99 | mean \\|head mass error\\| | teacher mass outside the top-k (for scale) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for k in (8, 64):
        exact = np.take_along_axis(full, order[:, :k], 1)
        p_head = np.exp(exact).sum(1)
        tail = float(np.mean(1 - p_head))  # the teacher mass a top-k cache drops anyway, for scale
        e = e5m2(exact)
        variants = {"float16 (today)": (exact.astype(np.float16).astype(np.float32), exact.astype(np.float16),
                                        pa.float16(), True),
                    "e5m2 (1 byte)": (e, (e.astype(np.float16).view(np.uint16) >> 8).astype(np.uint8), pa.uint8(), False)}
        for step in (1 / 16, 1 / 8):
            codes, decoded = uint8_steps(exact, step)
            variants[f"uint8, 1/{round(1 / step)} nat steps"] = (decoded, codes, pa.uint8(), False)
        for name, (decoded, stored, arrow_type, split) in variants.items():
            kl = kl_rows(exact, decoded)
            mass = np.abs(np.exp(decoded).sum(1) - p_head)
            size = column_bytes(stored, arrow_type, n, split)
            print(f"| {k} | {name} | {size:.2f} | {kl.mean():.2e} | {np.quantile(kl, 0.99):.2e} | {mass.mean():.2e} "
                  f"| {tail:.3f} |")


if __name__ == "__main__":
    main()
