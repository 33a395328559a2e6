"""95 % intervals for the held-out perplexity gaps of the masked-LM rows in benchmarks/quality.md
("Masked-LM pipeline (issue 15 goals)"): a paired bootstrap over the held-out cache's masked positions.

Run after `python3 pipelines/masked_lm.py --small` and the quality_targets.py call shown in quality.md:

    python3 benchmarks/mlm_gap_bootstrap.py

Each student's negative log-likelihood of every held-out label is recomputed with transformers (inputs as
stored in the held-out cache, attention on the non-pad tokens); the perplexities printed match `kdcache
evaluate`'s. Resampling the positions (the same resample for both sides of each gap) measures how much of a
gap the held-out sample could move, not the training seed's share.
"""
from __future__ import annotations

import glob

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForMaskedLM

PIPELINE = "runs/masked_lm-small"
R = "runs/quality_targets/max-steps-60/"
RUNS = {"online": R + "online", "top-k+sample 8+16": R + "k8s16", "sample 16": R + "s16", "top-k+sample 4+8": R + "k4s8",
        "top-64": f"{PIPELINE}/runs/L3-H384-init", "top-8": R + "k8", "8+16 @0.2": R + "k8s16-sel0.2",
        "8+16 @0.1": R + "k8s16-sel0.1", "4+8 counts @0.2": R + "k4s8c-sel0.2", "hard labels": R + "hard"}


def nll(path: str, rows: list) -> np.ndarray:
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logp = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[0].log_softmax(-1)
            out += [-logp[p, label].item() for p, label in zip(r["positions"], r["labels"])]
    return np.array(out)


def main():
    torch.set_num_threads(1)
    shards = sorted(glob.glob(f"{PIPELINE}/eval-cache/**/*.parquet", recursive=True))
    rows = [r for f in shards for r in pq.read_table(f, columns=["input_ids", "positions", "labels"]).to_pylist()]
    losses = {name: nll(path, rows) for name, path in RUNS.items()}
    online = losses["online"]
    n = len(online)
    resample = np.random.default_rng(0).integers(0, n, (2000, n))
    print(f"online KD: {n} positions, perplexity {np.exp(online.mean()):.1f}")
    for name, v in losses.items():
        if name == "online":
            continue
        gaps = np.exp(v[resample].mean(1) - online[resample].mean(1)) - 1
        print(f"{name}: perplexity {np.exp(v.mean()):.1f}, gap {np.exp(v.mean() - online.mean()) - 1:+.2%}, "
              f"95 % [{np.percentile(gaps, 2.5):+.2%}, {np.percentile(gaps, 97.5):+.2%}]")


if __name__ == "__main__":
    main()
