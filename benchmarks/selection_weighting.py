"""How a selected cache's loss should weigh its positions: measured, not adopted (issue 15, item 3).

`DistillLoss` on a selected cache (`dump-logits --select-positions F`) uses a per-position alpha: a selected
position adds alpha·KD + (1 - alpha)·CE, an unselected one its CE alone at full weight, and the KD sum is
averaged over every target. The KD term then carries only about F of the weight it has without selection.
This script trains the same student from the same cache with the alternative "KD keeps its share":

    loss = alpha · mean over selected positions of KD + (1 - alpha) · mean over labelled positions of CE

(equal to the ordinary loss when every position is selected), by patching the loss in this process only,
and evaluates both on the pipeline's held-out cache. The per-position run is the one
`quality_targets.py` left (or is trained here with --both).

    python3 benchmarks/selection_weighting.py --cache runs/quality_targets_r2/cache-k8s16-sel0.2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from train_common import REPO


def kd_share_loss():
    """Patch kdcache's loss for selected caches to the "KD keeps its share" weighting (this process only):
    CE at (1 - alpha) at every labelled position, and the KD sum scaled by N / selected, so that
    DistillLoss's alpha · KD_sum / N becomes alpha · KD_sum / selected. (The logged kd_loss is scaled too.)"""
    from kdcache.train import losses

    scale = {"kd": 1.0}

    def selected_kd_and_ce(logits, labels, soft, soft_mask, alpha, temperature=1.0):
        known = labels >= 0
        labels_at = labels.clamp(min=0).unsqueeze(-1)
        w, log_w = losses._soft_weights({**soft, "soft_mask": soft_mask}, logits.dtype, temperature)
        label_weights = known.to(logits.dtype) * (1 - alpha)  # CE at (1 - alpha) everywhere
        kd, hard, ce = losses._SparseTargetCE.apply(logits, soft["target_ids"].long(), w, log_w, labels_at,
                                                    label_weights.unsqueeze(-1), float(temperature))
        return torch.stack([kd * scale["kd"], hard, (ce.squeeze(-1) * known.to(ce.dtype)).sum()])

    original_call = losses.DistillLoss.__call__

    def call(self, hidden, head, batch, teacher_logits=None):
        mask = batch.get("soft_mask")
        if mask is not None:
            scale["kd"] = batch["labels"].shape[0] / max(int(mask.sum()), 1)
        return original_call(self, hidden, head, batch, teacher_logits)

    losses.selected_kd_and_ce = selected_kd_and_ce
    losses.DistillLoss.__call__ = call


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="a selected cache (dump-logits --select-positions)")
    ap.add_argument("--pipeline", type=Path, default=REPO / "runs" / "causal_lm-small")
    ap.add_argument("--student", default="L2-H576", help="run name in PIPELINE/runs whose options are reused")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "selection_weighting")
    args = ap.parse_args()

    from kdcache.cli import main as cli
    from kdcache.train.evaluate import evaluate

    options = json.loads((args.pipeline / "runs" / args.student / "train_summary.json").read_text())["args"]
    out = args.out / f"{args.cache.name}-kd-share"
    kd_share_loss()
    train = ["train-student", "--cache", args.cache, "--out", out, "--student", options["student"], "--no-progress",
             "--epochs", options["epochs"], "--batch-size", options["batch_size"], "--lr", options["lr"],
             "--seed", options["seed"], "--alpha", options["alpha"], "--num-workers", options["num_workers"]]
    if options.get("init_from_teacher"):
        train.append("--init-from-teacher")
    if not (out / "model.safetensors").is_file():
        try:
            cli([str(a) for a in train])
        except SystemExit as e:
            if e.code:
                raise
    eval_cache = args.pipeline / "eval-cache"
    online = evaluate(args.pipeline / "runs" / f"{args.student}-online", eval_cache)["perplexity"]
    result = evaluate(out, eval_cache)["perplexity"]
    print(f"{args.cache.name}: KD keeps its share {result:,.1f} ({(result - online) / online:+.1%} vs online KD {online:,.1f})")


if __name__ == "__main__":
    main()
