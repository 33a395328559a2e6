"""`dump-logits --no-draw-logprobs` (format v3): drawn kinds store counts without per-draw log-probs.
Checked against the same dump with log-probs: the same draws, ids, counts and head; the same weights,
gradients and trained student at T = 1; T != 1 refused; evaluate and inspect report only what the
cache still determines; verify tells the two layouts apart; caches without the option stay v2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dump_helpers import dump, dump_variants, manifest, read_rows, run_cli
from kdcache.cache.kinds.sample import empirical_logprobs
from kdcache.cache.stream import CacheStream
from kdcache.train.losses import DistillLoss, sparse_target_weights

COMMON = ["--max-length", 32, "--shard-rows", 16]
KINDS = {
    "sample": ["--targets", "sample", "--samples", 32],
    "top-k+sample": ["--targets", "top-k+sample", "--top-k", 4, "--samples", 32],
}
STUDENT = ["--student", "L2-H128", "--layers", 1, "--hidden", 16, "--heads", 2, "--intermediate", 32,
           "--batch-size", 4, "--num-workers", 0, "--no-progress"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_clm, shakespeare_txt) -> dict:
    """{(kind, with log-probs?): cache}, each pair from the same teacher, corpus and seed."""
    return dump_variants(tmp_path_factory.mktemp("draw_logprobs"), tiny_llama_clm, shakespeare_txt, KINDS, COMMON,
                         {True: [], False: ["--no-draw-logprobs"]})


def one_line_error(stderr: str) -> bool:
    return "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line.lower()]) == 1


def test_manifest_schema_and_the_same_draws(caches):
    """Without the option: format 2, targets as before; with it: format 3, "draw_logprobs": false, no
    sample_logprobs column, and every other value (ids, counts, head, labels) the same as with it."""
    for kind in KINDS:
        full, counts_only = caches[kind, True], caches[kind, False]
        a, b = manifest(full), manifest(counts_only)
        assert a["format_version"] == 2 and "draw_logprobs" not in a["targets"]
        assert b["format_version"] == 3 and b["targets"] == {**a["targets"], "draw_logprobs": False}
        schema = pq.read_schema(counts_only / "data" / "part-00000.parquet")
        assert schema.metadata[b"kdcache_format_version"] == b"3"
        assert [n for n in pq.read_schema(full / "data" / "part-00000.parquet").names if n != "sample_logprobs"] \
            == schema.names
        rows_a, rows_b = read_rows(full), read_rows(counts_only)
        assert len(rows_a) == len(rows_b) > 0
        for x, y in zip(rows_a, rows_b):
            assert set(x) - set(y) == {"sample_logprobs"} and set(y) <= set(x)
            for key in y:
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)
        assert b["totals"]["bytes"] < a["totals"]["bytes"]


def test_explicit_draw_logprobs_is_todays_cache(caches, tiny_llama_clm, shakespeare_txt, tmp_path):
    """--draw-logprobs (the default, spelt out) writes the very same shards and manifest targets."""
    out = tmp_path / "explicit"
    dump(tiny_llama_clm, shakespeare_txt, out, *COMMON, *KINDS["sample"], "--draw-logprobs")
    assert [s["sha256"] for s in manifest(out)["shards"]] == [s["sha256"] for s in manifest(caches["sample", True])["shards"]]
    assert manifest(out)["targets"] == manifest(caches["sample", True])["targets"]


def test_empirical_stand_in_matches_an_independent_computation():
    """Per entry log(count / N), plus log(1 - head mass) with a head; N = the position's draws."""
    counts = np.array([3, 1, 4, 2, 2], np.uint8)  # positions: [3, 1] | [] | [4] | [2, 2]
    offsets = np.array([0, 2, 2, 3, 5])
    want = np.log([3 / 4, 1 / 4, 4 / 4, 2 / 4, 2 / 4])
    np.testing.assert_allclose(empirical_logprobs(counts, offsets, None).astype(np.float64), want, atol=1e-3)
    head = np.log(np.array([[0.5, 0.2], [0.9, 0.05], [0.3, 0.3], [0.7, 0.5]])).astype(np.float16)
    tail = 1 - np.exp(head.astype(np.float64)).sum(1)
    got = empirical_logprobs(counts, offsets, head).astype(np.float64)
    np.testing.assert_allclose(got[:3], want[:3] + np.log(tail[[0, 0, 2]]), atol=2e-3)
    assert np.isfinite(got[3:]).all() and (got[3:] < -80).all()  # a head past all the mass: finite, weighs nothing


def _batches(cache):
    return list(CacheStream(cache, batch_size=8, shuffle=False))


def test_weights_and_gradients_equal_at_t1(caches):
    """Batch by batch: the same ids, counts and head; bit-identical weights and KD gradient; the KD
    value reported on the counts-only cache is the KL from the empirical distribution."""
    for kind in KINDS:
        for a, b in zip(_batches(caches[kind, True]), _batches(caches[kind, False]), strict=True):
            for key in ("target_ids", "target_counts", "labels", "target_positions"):
                assert torch.equal(a[key], b[key]), key
            head = a["target_head"]
            assert b["target_head"] == head and torch.equal(a["target_logprobs"][:, :head], b["target_logprobs"][:, :head])
            wa, _ = sparse_target_weights(a["target_logprobs"], a["target_counts"], head, 1.0)
            wb, _ = sparse_target_weights(b["target_logprobs"], b["target_counts"], head, 1.0)
            assert torch.equal(wa, wb)
            student = torch.randn(len(a["labels"]), 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            grads, kds = [], []
            for batch in (a, b):
                z = student.clone().requires_grad_(True)
                out = DistillLoss(alpha=0.7)(z, lambda h: h, batch)
                out.loss.backward()
                grads.append(z.grad)
                kds.append(float(out.kd))
            assert torch.equal(grads[0], grads[1])
            # Independently: w from the counts (FORMAT.md), KL(w || student) over the stored ids.
            counts = b["target_counts"].double()
            p_head = b["target_logprobs"][:, :head].double().exp()
            tail = (1 - p_head.sum(-1, keepdim=True)).clamp(min=0)
            w = torch.cat([p_head, tail * counts[:, head:] / 32], 1)
            log_q = student.log_softmax(-1).gather(1, b["target_ids"].long())
            kl = torch.where(w > 0, w * (w.clamp(min=1e-300).log() - log_q), 0.0).sum(-1).mean()
            assert kds[1] == pytest.approx(float(kl), rel=2e-3)


def test_a_trained_student_is_bit_identical(caches, tmp_path, capsys):
    """24 steps of train-student (same seed) from each cache of a pair: the same weights, bit for bit."""
    from safetensors.torch import load_file

    kind = "top-k+sample"
    outs = []
    for with_lp in (True, False):
        out = tmp_path / f"student-{with_lp}"
        code, _, err = run_cli(["train-student", "--cache", caches[kind, with_lp], *STUDENT, "--max-steps", 24,
                                "--lr", "3e-3", "--out", out], capsys)
        assert code == 0, err
        outs.append(load_file(out / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name
    # The soft targets did steer those steps: the same run on the hard labels alone ends elsewhere.
    hard = tmp_path / "hard"
    code, _, err = run_cli(["train-student", "--cache", caches[kind, False], *STUDENT, "--max-steps", 24, "--lr", "3e-3",
                            "--alpha", 0, "--out", hard], capsys)
    assert code == 0, err
    other = load_file(hard / "model.safetensors")
    assert any(not torch.equal(other[name], outs[1][name]) for name in other)


def test_temperature_other_than_1_is_refused(caches, tmp_path, capsys):
    code, _, err = run_cli(["train-student", "--cache", caches["sample", False], *STUDENT, "--max-steps", 1,
                            "--temperature", 2, "--out", tmp_path / "t2"], capsys)
    assert code != 0 and one_line_error(err) and "--draw-logprobs" in err and "--temperature 1" in err, err
    assert not (tmp_path / "t2" / "model.safetensors").exists()
    # The Python API's trainer refuses it too (its loss at T = 2 would weigh draws by the stand-in).
    from kdcache.errors import KdcacheError
    from kdcache.integrations.transformers import KDTrainer
    with pytest.raises(KdcacheError, match="--no-draw-logprobs"):
        KDTrainer(model=None, args=None, train_dataset=caches["sample", False], loss=DistillLoss(temperature=2.0))


def test_top_k_refuses_the_option(tiny_llama_clm, shakespeare_txt, tmp_path, capsys):
    code, _, err = dump(tiny_llama_clm, shakespeare_txt, tmp_path / "c", *COMMON, "--targets", "top-k", "--no-draw-logprobs",
                        capsys=capsys, check=False)
    assert code != 0 and one_line_error(err) and "--no-draw-logprobs" in err, err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_evaluate_reports_only_what_the_cache_determines(caches, tiny_llama_clm):
    """kl and the teacher figures that need drawn log-probs are None; the rest equal the full cache's."""
    from kdcache.train.evaluate import evaluate

    for kind in KINDS:
        full, counts_only = evaluate(tiny_llama_clm, caches[kind, True]), evaluate(tiny_llama_clm, caches[kind, False])
        assert full["kl"] is not None and counts_only["kl"] is None
        for key in ("top1_agreement", "accuracy", "perplexity", "ece", "teacher_accuracy"):
            assert counts_only[key] == pytest.approx(full[key], rel=1e-6), key
        if kind == "sample":  # no stored log-prob is the teacher's
            assert counts_only["teacher_ece"] is None and counts_only["teacher_perplexity"] is None
        else:  # the head's are exact: its top-1 confidence still is
            assert counts_only["teacher_ece"] == pytest.approx(full["teacher_ece"], rel=1e-6)
            assert counts_only["teacher_perplexity"] is None  # labels drawn from the tail have no log-prob


def test_verify_and_inspect(caches, capsys):
    for kind in KINDS:
        code, out, err = run_cli(["verify", caches[kind, False]], capsys)
        assert code == 0 and out.startswith("ok:"), err
        stats = {}
        for with_lp in (True, False):
            code, out, _ = run_cli(["inspect", caches[kind, with_lp], "--json"], capsys)
            stats[with_lp] = json.loads(out)
        assert stats[True]["mean_stored_mass"] is not None and stats[False]["mean_stored_mass"] is None
        assert stats[False]["format_version"] == 3 and stats[False]["draw_logprobs"] is False
        assert stats[True]["draw_logprobs"] is True
        for key in ("mean_ids_per_position", "mean_topk_mass", "mean_tail_mass", "teacher_top1_accuracy"):
            assert stats[False][key] == stats[True][key], key


@pytest.mark.parametrize("lie", ["claims-logprobs", "claims-counts-only", "claims-version-2"])
def test_verify_catches_a_manifest_that_lies_about_the_column(caches, tmp_path, capsys, lie):
    source = caches["sample", False] if lie != "claims-counts-only" else caches["sample", True]
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    m = manifest(cache)
    if lie == "claims-logprobs":
        m["format_version"] = 2
        del m["targets"]["draw_logprobs"]
    elif lie == "claims-counts-only":
        m["format_version"] = 3
        m["targets"]["draw_logprobs"] = False
    else:  # counts only, but version 2: a v2 reader would take it for a cache with log-probs
        m["format_version"] = 2
    (cache / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["verify", cache], capsys)
    assert code != 0 and one_line_error(err), err
    assert ("format_version 2" if lie == "claims-version-2" else "sample_logprobs") in err, err


def test_resuming_with_the_other_setting_is_refused(caches, tiny_llama_clm, shakespeare_txt, tmp_path, capsys):
    """draw_logprobs is part of the cache's identity: a re-run with the other setting would mix two layouts."""
    cache = tmp_path / "cache"
    shutil.copytree(caches["sample", True], cache)
    code, _, err = dump(tiny_llama_clm, shakespeare_txt, cache, *COMMON, *KINDS["sample"], "--no-draw-logprobs",
                        capsys=capsys, check=False)
    assert code != 0 and one_line_error(err) and "targets.draw_logprobs" in err, err
    assert manifest(cache) == manifest(caches["sample", True])  # nothing written


def test_format_md_recipe_reads_a_counts_only_cache(caches):
    """FORMAT.md's pandas recipe needs only ids and counts at T = 1: on the counts-only cache it gives
    the weights the loss trains with."""
    import pandas as pd

    cache = caches["top-k+sample", False]
    n = manifest(cache)["targets"]["samples"]
    df = pd.read_parquet(cache / "data").sort_values("example_id")
    assert "sample_logprobs" not in df.columns
    rebuilt = []
    for _, row in df.iterrows():
        split = np.cumsum(row["sample_lengths"])[:-1]
        sample_ids, sample_counts = np.split(row["sample_ids"], split), np.split(row["sample_counts"], split)
        for p in range(len(row["positions"])):
            head_p = np.exp(row["topk_logprobs"][p].astype(np.float64))
            tail = max(0.0, 1.0 - head_p.sum())
            weights = {int(i): float(w) for i, w in zip(row["topk_ids"][p], head_p)}
            weights.update({int(i): tail * c / n for i, c in zip(sample_ids[p], sample_counts[p].astype(np.float64))})
            rebuilt.append(weights)
    from_loss = []
    for batch in _batches(cache):
        w, _ = sparse_target_weights(batch["target_logprobs"].double(), batch["target_counts"], batch["target_head"], 1.0)
        from_loss += [{i: x for i, x in zip(ids, ws) if x > 0} for ids, ws in zip(batch["target_ids"].tolist(), w.tolist())]
    assert len(rebuilt) == len(from_loss)
    for a, b in zip(rebuilt, from_loss):
        assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-9 for i in a)


def test_dry_run_estimates_fewer_bytes(tiny_llama_clm, shakespeare_txt, tmp_path, capsys):
    """The dry run's bound drops the 2 B fp16 log-prob of every draw (32 per position here)."""
    from kdcache.dump.run import DumpOptions, run_dump

    sizes = []
    for extra in ({}, {"draw_logprobs": False}):
        result = run_dump(DumpOptions(teacher=str(tiny_llama_clm), data=str(shakespeare_txt), out=tmp_path / "d",
                                      max_length=32, targets="sample", samples=32, dry_run=True, progress=False,
                                      echo=lambda *a, **k: None, **extra))
        sizes.append(result.extra["estimated_bytes"] / result.positions)
    assert sizes[0] - sizes[1] == pytest.approx(32 * 2)
