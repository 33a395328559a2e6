"""End to end on a CUDA machine, through the real CLI: dump (bf16 and fp16) -> verify -> train
(hard-only, cached KD, online KD) -> evaluate, with side-by-side throughput ratios.

Teacher: a randomly initialised Llama with SmolLM2-135M's exact shape (30 layers, hidden 576,
vocab 49,152) and, when given, SmolLM2's tokenizer — speed does not depend on the weights.

    python benchmarks/gpu_end_to_end.py --tokenizer DIR [--work /tmp/kd-gpu] [--steps 150]
    python benchmarks/gpu_end_to_end.py --tokenizer DIR --smoke    # tiny shapes on the CPU: checks the script

Prints one JSON object per measurement and a summary table; exits non-zero if a step fails or
the bf16 cache disagrees with an fp32 forward beyond bf16 tolerance.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"


def kdcache(*args: str) -> float:
    """Run `python -m kdcache ...`, fail loudly, return wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdcache", *args], text=True, capture_output=True)
    seconds = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    print(f"$ kdcache {' '.join(args)}  [{seconds:.1f}s, rc={proc.returncode}]\n    " + "\n    ".join(tail), flush=True)
    if proc.returncode:
        sys.exit(f"kdcache {args[0]} failed")
    return seconds


def build_teacher(out: Path, tokenizer_dir: Path | None, smoke: bool):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    config = LlamaConfig(vocab_size=49152, **shape,
                         num_attention_heads=9 if not smoke else 4, num_key_value_heads=3 if not smoke else 2, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


def bare_forward_rate(model, cache: Path, dtype, batch_rows: int, device: str) -> float:
    """Tokens/s of model(**batch) alone over the cache's own rows (same lengths), on the GPU."""
    import pyarrow.parquet as pq
    import torch

    ids = pq.read_table(cache / "data", columns=["input_ids"]).column("input_ids").to_pylist()
    model = model.to(device, dtype=dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids.sort(key=len, reverse=True)
    batches = []
    for i in range(0, len(ids), batch_rows):
        chunk = ids[i:i + batch_rows]
        width = len(chunk[0])
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, row in enumerate(chunk):
            x[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        batches.append((x, mask))
    with torch.inference_mode():
        for x, mask in batches[:2]:  # warm-up
            model(input_ids=x.to(device), attention_mask=mask.to(device))
        sync()
        start = time.perf_counter()
        for x, mask in batches:
            logits = model(input_ids=x.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True)).logits
        sync()
        seconds = time.perf_counter() - start
    del logits
    return sum(len(r) for r in ids) / seconds


def bf16_agreement(model, cache: Path, device: str, rows: int = 8) -> dict:
    """Cached bf16 top-k log-probs vs an fp32 forward of the same rows on the GPU."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    t = pq.read_table(cache / "data").slice(0, rows).to_pydict()
    model = model.to(device, dtype=torch.float32).eval()
    top1, errs = [], []
    with torch.inference_mode():
        for ids, pos, tk, lp in zip(t["input_ids"], t["positions"], t["topk_ids"], t["topk_logprobs"]):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
            tk, lp = np.array(tk), np.array(lp, dtype=np.float32)
            ref = logp[pos].numpy()
            top1.append((ref.argmax(1) == tk[:, 0]).mean())
            errs.append(np.abs(np.take_along_axis(ref, tk, 1) - lp).max())
    return {"rows": rows, "top1_agreement_vs_fp32": float(np.mean(top1)), "max_abs_logprob_err": float(np.max(errs))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2 tokenizer folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kd-gpu"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--student", default="L4-H256")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--corpus-copies", type=int, default=1,
                    help="dump Tiny Shakespeare repeated N times (a longer run amortises CUDA warm-up and the last shard write)")
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--dump-only", action="store_true", help="stop after the dump-vs-bare-forward comparison")
    ap.add_argument("--smoke", action="store_true", help="tiny teacher, 300 lines, CPU: checks the script itself")
    args = ap.parse_args()
    import torch

    device = "cpu" if args.smoke else "cuda"
    assert args.smoke or torch.cuda.is_available(), "needs a CUDA device (or --smoke)"
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}), flush=True)
    limit = ["--limit", "300"] if args.smoke else []
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / "teacher"
    model, _ = build_teacher(teacher_dir, args.tokenizer, args.smoke)
    results = {}

    corpus = CORPUS
    if args.corpus_copies > 1:
        corpus = work / f"corpus_x{args.corpus_copies}.txt"
        corpus.write_text(CORPUS.read_text() * args.corpus_copies)
    common = ["--teacher", str(teacher_dir), "--data", str(corpus), "--shard-rows", str(args.shard_rows), "--max-length", str(args.max_length),
              "--targets", "top-k", "--top-k", "64", "--device", device, "--no-progress"]
    for dtype in ("bf16",) if args.dump_only else ("bf16", "fp16"):
        cache = work / f"cache-{dtype}"
        seconds = kdcache("dump-logits", *common, *limit, "--out", str(cache), "--dtype", dtype)
        manifest = json.loads((cache / "manifest.json").read_text())
        results[f"dump_{dtype}"] = {"command_seconds": round(seconds, 1), **manifest["dump"],
                                    "rows": manifest["totals"]["rows"], "bytes": manifest["totals"]["bytes"],
                                    "positions": manifest["totals"]["positions"]}
        print(json.dumps({f"dump_{dtype}": results[f"dump_{dtype}"]}), flush=True)
    cache = work / "cache-bf16"
    kdcache("verify", str(cache))
    kdcache("inspect", str(cache))

    bare = bare_forward_rate(model, cache, torch.bfloat16, batch_rows=16, device=device)
    results["bare_forward_bf16_tokens_per_second"] = bare
    results["dump_bf16_loop_over_bare"] = bare / results["dump_bf16"]["tokens_per_second"]
    results["bf16_vs_fp32"] = bf16_agreement(model, cache, device)
    print(json.dumps({k: results[k] for k in ("bare_forward_bf16_tokens_per_second", "dump_bf16_loop_over_bare",
                                              "bf16_vs_fp32")}), flush=True)
    if args.dump_only:
        (work / "results.json").write_text(json.dumps(results, indent=2))
        return
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    heldout = work / "heldout"
    kdcache("dump-logits", *common, "--out", str(heldout), "--dtype", "bf16", "--limit", "100" if args.smoke else "2000")

    train = ["train-student", "--cache", str(cache), "--student", args.student, "--max-steps", str(args.steps),
             "--batch-size", "16", "--device", device, "--num-workers", "1" if args.smoke else "4"]
    for mode, extra in (("hard", ["--alpha", "0"]), ("cached_kd", ["--alpha", "0.5"]),
                        ("online_kd", ["--alpha", "0.5", "--online-teacher", str(teacher_dir)])):
        out = work / f"student-{mode}"
        kdcache(*train, "--out", str(out), *extra)
        summary = json.loads((out / "train_summary.json").read_text())
        results[f"train_{mode}"] = {key: summary.get(key) for key in ("steps", "tokens", "seconds", "tokens_per_second")}
        print(json.dumps({f"train_{mode}": results[f"train_{mode}"]}), flush=True)
    kdcache("evaluate", "--model", str(work / "student-cached_kd"), "--cache", str(heldout), "--json")

    hard, cached, online = (results[f"train_{m}"]["tokens_per_second"] for m in ("hard", "cached_kd", "online_kd"))
    results["ratios"] = {
        "cached_kd_step_over_hard_step": hard / cached,
        "speedup_cached_over_online": cached / online,
        "dump_bf16_over_fp16_tokens_per_second": results["dump_bf16"]["tokens_per_second"] / results["dump_fp16"]["tokens_per_second"],
    }
    print(json.dumps({"ratios": results["ratios"]}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if results["bf16_vs_fp32"]["max_abs_logprob_err"] > 0.5:
        sys.exit("bf16 cache disagrees with the fp32 forward beyond tolerance")


if __name__ == "__main__":
    main()
