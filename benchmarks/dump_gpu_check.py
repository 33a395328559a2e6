"""CUDA path of dump-logits: cached targets on GPU (fp32/fp16/bf16) against a CPU fp32 dump of the same rows.

Needs a CUDA machine. Prints agreement figures; exits non-zero if fp32-on-GPU disagrees with CPU.

    python benchmarks/dump_gpu_check.py [--lines 400]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rows_of(cache):
    import pyarrow.parquet as pq
    t = pq.read_table(Path(cache) / "data").sort_by("example_id")
    return t.to_pydict()


def compare(ref, got, label):
    assert ref["example_id"] == got["example_id"] and ref["input_ids"] == got["input_ids"] and ref["labels"] == got["labels"]
    lp_ref = np.concatenate([np.array(x, dtype=np.float32) for x in ref["topk_logprobs"]])
    lp_got = np.concatenate([np.array(x, dtype=np.float32) for x in got["topk_logprobs"]])
    id_ref = np.concatenate([np.array(x) for x in ref["topk_ids"]])
    id_got = np.concatenate([np.array(x) for x in got["topk_ids"]])
    top1 = (id_ref[:, 0] == id_got[:, 0]).mean()
    # Values, not ids: a random-weight teacher is nearly uniform, so near-ties flip ids between devices.
    err = np.abs(lp_ref - lp_got)
    print(f"{label}: {len(lp_ref):,} positions; top-1 id agreement {top1:.4f}; |sorted top-k log-prob diff| "
          f"max {err.max():.4f} mean {err.mean():.5f}")
    return top1, err.max()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=400)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-gpu"))
    args = ap.parse_args()
    import torch
    print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    from dump_common import SHAKESPEARE, bert_mlm_teacher
    from kdcache.dump.run import DumpOptions, run_dump

    work = Path(args.work)
    teacher = bert_mlm_teacher(work / "bert-base-random")
    corpus = work / "lines.txt"
    corpus.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:args.lines]) + "\n")
    runs = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16"), ("cuda", "bf16")):
        out = work / f"cache-{device}-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, device=device, dtype=dtype,
                                      max_length=128, targets="top-k", top_k=16, shard_rows=8, progress=False))
        print(f"{device} {dtype}: {result.rows} rows, {result.real_tokens:,} tokens, {result.seconds:.2f} s loop, "
              f"{result.real_tokens / result.seconds:,.0f} tokens/s")
        runs[(device, dtype)] = rows_of(out)
    ref = runs[("cpu", "fp32")]
    top1, err = compare(ref, runs[("cuda", "fp32")], "cuda fp32 vs cpu fp32")
    compare(ref, runs[("cuda", "fp16")], "cuda fp16 vs cpu fp32")
    compare(ref, runs[("cuda", "bf16")], "cuda bf16 vs cpu fp32")
    # resume on GPU: drop two shards, re-run, same bytes as before
    out = work / "cache-cuda-fp16"
    for i in (0, 3):
        (out / "data" / f"_part-{i:05d}.stats.json").unlink()
    run_dump(DumpOptions(teacher=str(teacher), data=str(corpus), out=out, device="cuda", dtype="fp16",
                         max_length=128, targets="top-k", top_k=16, shard_rows=8, progress=False))
    again = rows_of(out)
    same = again == runs[("cuda", "fp16")]
    print(f"cuda fp16 resume of 2 shards row-identical to the first run: {same}")
    if err > 0.01 or not same:
        sys.exit("GPU results disagree with CPU")


if __name__ == "__main__":
    main()
