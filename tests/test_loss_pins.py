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

from conftest import shakespeare_lines
from kdcache.train.loop import TrainConfig, train
from kdcache.train.students import Sizes
from stage2_helpers import MLM, cli_ok, teacher_cache

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
    'topk_renorm': [[4.9635725021362305, 3.9263100624084473, 6.000834941864014], [4.95350456237793, 3.910688877105713, 5.996320724487305], [4.939444065093994, 3.889511823654175, 5.989376544952393], [4.942119598388672, 3.8868634700775146, 5.99737548828125]],
    'topk_t2_accum_chunked': [[10.840609550476074, 15.680852890014648, 6.000365257263184], [10.815272331237793, 15.632957458496094, 5.997587203979492], [10.773866653442383, 15.575437545776367, 5.972295761108398], [10.750929832458496, 15.545698165893555, 5.956161975860596]],
    'topk_bucket_t2': [[3.5724010467529297, 2.5316436290740967, 6.000834941864014], [3.5611939430236816, 2.5177814960479736, 5.995822906494141], [3.543508529663086, 2.495478630065918, 5.988912105560303], [3.543717861175537, 2.492129325866699, 5.997424602508545]],
    'hard_only': [[6.000834941864014, None, 6.000834941864014], [5.995983123779297, None, 5.995983123779297], [5.991604804992676, None, 5.991604804992676], [5.998331069946289, None, 5.998331069946289]],
    'online_t2': [[3.00663685798645, 0.012438571080565453, 6.000834941864014], [3.0040814876556396, 0.012297708541154861, 5.995865345001221], [3.0018279552459717, 0.012370769865810871, 5.99128532409668], [3.0053277015686035, 0.012333155609667301, 5.998322010040283]],
    'sampled_clm': [[1.2075251340866089, 0.011617995798587799, 5.991153717041016], [1.2106025218963623, 0.017544269561767578, 5.982835292816162], [1.2045001983642578, 0.012550748884677887, 5.972297668457031], [1.2058780193328857, 0.013514049351215363, 5.975334167480469]],
    'sampled_clm_t2_chunked': [[3.0015671253204346, 0.011980436742305756, 5.991153717041016], [3.0077638626098633, 0.03334244340658188, 5.982185363769531], [2.996074676513672, 0.020900124683976173, 5.971249103546143], [2.99523663520813, 0.016754887998104095, 5.973718166351318]],
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_bert_mlm, tiny_llama_clm, shakespeare_txt):
    root = tmp_path_factory.mktemp("pins")
    mlm = teacher_cache(root / "mlm", tiny_bert_mlm, MLM, shakespeare_lines(60)[:48], k=8, row_group_rows=8)
    clm = root / "clm"
    cli_ok(["dump-logits", "--teacher", tiny_llama_clm, "--data", shakespeare_txt, "--out", clm, "--limit", 40,
            "--max-length", 24, "--targets", "top-k+sample", "--top-k", 4, "--samples", 8, "--no-progress"])
    return {"mlm": mlm, "clm": clm, "teachers": {"mlm": tiny_bert_mlm, "clm": tiny_llama_clm}}


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
