"""Pinned per-step losses of short train-student runs, recorded from the loop and loss as they
were before `_train` and `DistillLoss` were rebuilt from the public pieces (kdcache.api): the
refactor must not change a number. Every loss path is covered: the fused sparse path (top-k and
sampled targets, T = 1 and T != 1), the rest bucket, hard labels only, online KD, chunked heads
and gradient accumulation, dropout on.

Set KDCACHE_RECORD_PINS=1 to print the current numbers instead of checking them.
"""
from __future__ import annotations

import json
import os

import pytest

from kdcache.train.loop import TrainConfig, train
from kdcache.train.students import Sizes
from stage2_helpers import MLM, cli_ok, write_cache

TINY = Sizes(layers=1, hidden=32, heads=2, intermediate=64)
# name -> (cache, options); every run: 4 steps, batch 8, 0 workers, log every step, seed 3.
RUNS = {
    "topk_renorm": ("mlm", {}),
    "topk_t2_accum_chunked": ("mlm", {"temperature": 2.0, "grad_accum": 2, "chunk_elements": 5000}),
    "topk_bucket_t2": ("mlm", {"tail": "bucket", "temperature": 2.0, "alpha": 0.7}),
    "hard_only": ("mlm", {"alpha": 0.0}),
    "online_t2": ("mlm", {"online_teacher": "TEACHER", "temperature": 2.0}),
    "sampled_clm": ("clm", {"alpha": 0.8}),
    "sampled_clm_t2_chunked": ("clm", {"temperature": 2.0, "chunk_elements": 20000}),
}
PINS = {
    # recorded from the original code (commit cdf8ae6) with KDCACHE_RECORD_PINS=1
    'topk_renorm': [[3.75864839553833, 2.7265470027923584, 4.790749549865723], [3.7686355113983154, 2.714777946472168, 4.822493076324463], [3.746936082839966, 2.6923255920410156, 4.801546573638916], [3.7334070205688477, 2.6801960468292236, 4.786618232727051]],
    'topk_t2_accum_chunked': [[7.83796501159668, 10.870332717895508, 4.805596351623535], [7.802402496337891, 10.810747146606445, 4.7940568923950195], [7.786140441894531, 10.773839950561523, 4.798440933227539], [7.768499374389648, 10.742359161376953, 4.7946391105651855]],
    'topk_bucket_t2': [[3.078190326690674, 2.344236373901367, 4.790749549865723], [3.078857898712158, 2.332096815109253, 4.821300506591797], [3.058136463165283, 2.3102622032165527, 4.803176403045654], [3.0446786880493164, 2.2978947162628174, 4.787174701690674]],
    'hard_only': [[4.790749549865723, None, 4.790749549865723], [4.8236470222473145, None, 4.8236470222473145], [4.800867080688477, None, 4.800867080688477], [4.779287338256836, None, 4.779287338256836]],
    'online_t2': [[2.4018924236297607, 0.013035355135798454, 4.790749549865723], [2.418447494506836, 0.013451861217617989, 4.8234429359436035], [2.407024621963501, 0.01329062506556511, 4.8007588386535645], [2.396638870239258, 0.013486530631780624, 4.779791355133057]],
    'sampled_clm': [[1.2075251340866089, 0.011617995798587799, 5.991153717041016], [1.2106025218963623, 0.017544269561767578, 5.982835292816162], [1.2045001983642578, 0.012550748884677887, 5.972297668457031], [1.2058780193328857, 0.013514049351215363, 5.975334167480469]],
    'sampled_clm_t2_chunked': [[3.0015671253204346, 0.011980436742305756, 5.991153717041016], [3.0077638626098633, 0.03334244340658188, 5.982185363769531], [2.996074676513672, 0.020900124683976173, 5.971249103546143], [2.99523663520813, 0.016754887998104095, 5.973718166351318]],
}


def mlm_teacher_cache(root):
    """A random tiny BERT teacher and a top-8 cache of random masked rows under it, from seeds
    only (the fixture tokenizers' WordPiece training is not reproducible across processes)."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    teacher = BertForMaskedLM(config).eval()
    teacher.save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        ids = rng.integers(5, 120, int(rng.integers(8, 24))).tolist()
        positions = sorted(rng.choice(len(ids), max(1, len(ids) // 3), replace=False).tolist())
        masked = [4 if p in positions else t for p, t in enumerate(ids)]
        with torch.no_grad():
            logprobs = teacher(input_ids=torch.tensor([masked])).logits[0, positions].log_softmax(-1)
        top = logprobs.topk(8, dim=-1)
        rows.append({"example_id": i, "input_ids": masked, "positions": positions, "labels": [ids[p] for p in positions],
                     "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.half().tolist()})
    teacher_info = {"source": str(root / "teacher"), "model_type": "bert"}
    cache = write_cache(root / "mlm", rows, task=MLM, k=8, vocab_size=120, max_length=32, shard_rows=24,
                        row_group_rows=8, special_token_ids={"pad": 0, "mask": 4}, teacher=teacher_info)
    return cache, root / "teacher"


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_clm, shakespeare_txt):
    root = tmp_path_factory.mktemp("pins")
    mlm, mlm_teacher = mlm_teacher_cache(root)
    clm = root / "clm"
    cli_ok(["dump-logits", "--teacher", tiny_llama_clm, "--data", shakespeare_txt, "--out", clm, "--limit", 40,
            "--max-length", 24, "--targets", "top-k+sample", "--top-k", 4, "--samples", 8, "--no-progress"])
    return {"mlm": mlm, "clm": clm, "teachers": {"mlm": mlm_teacher, "clm": tiny_llama_clm}}


def run_losses(caches, name, out):
    which, options = RUNS[name]
    options = {k: (caches["teachers"][which] if v == "TEACHER" else v) for k, v in options.items()}
    cfg = TrainConfig(cache=caches[which], student="L2-H128", out=out, sizes=TINY, max_steps=4, batch_size=8,
                      num_workers=0, log_every=1, seed=3, progress=False, **options)
    train(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[m["loss"], m["kd_loss"], m["hard_loss"]] for m in lines]


@pytest.mark.parametrize("name", list(RUNS))
def test_short_run_losses_are_pinned(caches, name, tmp_path):
    got = run_losses(caches, name, tmp_path / name)
    if os.environ.get("KDCACHE_RECORD_PINS"):
        print(f"PIN {name!r}: {got!r},")
        return
    want = PINS[name]
    assert len(got) == len(want) == 4
    for step, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            assert (a is None) == (b is None), (name, step)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-6, abs=1e-7), (name, step, g, w)
