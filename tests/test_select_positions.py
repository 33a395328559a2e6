"""Token selection (`dump-logits --select-positions FRACTION`, format v3): soft targets only at each row's
highest-entropy targets, checked against a direct teacher forward and against the same data dumped
without selection; the soft_mask column through verify, the stream, the loss, inspect and evaluate;
identity, refusals, and v2 caches written exactly as before."""
from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from dump_helpers import dump, dump_variants, manifest, read_rows, run_cli
from kdcache.cache.schema import selected_counts
from kdcache.cache.stream import CacheStream
from kdcache.dump.targets import select_targets
from kdcache.train.losses import DistillLoss

COMMON = ["--max-length", 32, "--shard-rows", 16]
KINDS = {
    "top-k+sample": ["--targets", "top-k+sample", "--top-k", 4, "--samples", 16],
    "sample": ["--targets", "sample", "--samples", 16],
}
FRACTION = 0.2


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_clm, shakespeare_txt) -> dict:
    """The same data dumped with and without --select-positions, for both sampled kinds."""
    return dump_variants(tmp_path_factory.mktemp("select"), tiny_llama_clm, shakespeare_txt, KINDS, COMMON,
                         {False: [], True: ["--select-positions", FRACTION]})


def one_line_error(stderr: str) -> bool:
    return "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line.lower()]) == 1


def teacher_entropy(teacher_dir, input_ids: list[int], positions: list[int]) -> np.ndarray:
    """-Σ p log p of the teacher's full softmax at each position, from a direct fp64 forward of the row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0, positions].double()
    lp = logits.log_softmax(-1)
    return -(lp.exp() * lp).sum(-1).numpy()


def test_rounding_rule_is_exact_decimal_ceil():
    n = np.array([0, 1, 5, 10, 31, 32, 100])
    assert selected_counts(0.7, n).tolist() == [0, 1, 4, 7, 22, 23, 70]  # float 0.7 * 10 would ceil to 8
    assert selected_counts(0.2, n).tolist() == [math.ceil(Fraction(1, 5) * int(x)) for x in n]
    assert selected_counts(1.0, n).tolist() == n.tolist()
    assert selected_counts(None, n).tolist() == n.tolist()


def test_select_targets_keeps_highest_entropy_per_row_ties_to_the_lower_position():
    entropy = torch.tensor([1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0])
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    counts, keep = np.array([4, 3]), np.array([2, 2])
    starts = np.cumsum(counts) - counts
    keep_at = torch.tensor(np.concatenate([s + np.arange(k) for s, k in zip(starts, keep)]))
    assert select_targets(entropy, rows, keep_at).tolist() == [1, 2, 4, 5]


def test_selection_matches_a_direct_forward_and_the_unselected_dump(caches, tiny_llama_clm):
    """Per row exactly ceil(0.2 × targets) are selected, the highest-entropy ones by an independent fp64
    forward; the soft targets there equal the unselected dump's at the same positions, byte for byte."""
    for kind in KINDS:
        full, sel = read_rows(caches[kind, False]), read_rows(caches[kind, True])
        assert len(full) == len(sel) > 0
        for a, b in zip(full, sel):
            for key in ("example_id", "input_ids", "positions", "labels"):
                assert a[key] == b[key]
            mask = np.array(b["soft_mask"], dtype=bool)
            n = len(b["positions"])
            assert len(mask) == n and mask.sum() == math.ceil(Fraction(1, 5) * n)
            if kind == "top-k+sample" and a["example_id"] < 12:  # the entropy check on a dozen rows is enough
                h = teacher_entropy(tiny_llama_clm, b["input_ids"], b["positions"])
                # Every selected entropy >= every unselected one (up to fp32-vs-fp64 rounding).
                assert h[mask].min() >= h[~mask].max() - 1e-5
            if "topk_ids" in b:
                np.testing.assert_array_equal(b["topk_ids"], a["topk_ids"][mask])
                np.testing.assert_array_equal(b["topk_logprobs"], a["topk_logprobs"][mask])
            assert b["sample_lengths"] == [x for x, m in zip(a["sample_lengths"], mask) if m]
            starts = np.concatenate([[0], np.cumsum(a["sample_lengths"])])
            for key in ("sample_ids", "sample_logprobs", "sample_counts"):
                kept = [a[key][starts[j]:starts[j + 1]] for j in np.flatnonzero(mask)]
                assert b[key] == [x for part in kept for x in part], key


def test_manifest_versions_and_v2_unchanged(caches):
    for kind in KINDS:
        m2, m3 = manifest(caches[kind, False]), manifest(caches[kind, True])
        assert m2["format_version"] == 2 and "select_positions" not in m2["targets"]
        assert m3["format_version"] == 3
        assert m3["targets"] == {**m2["targets"], "select_positions": FRACTION, "select_by": "entropy"}
        for cache, version, mask in ((caches[kind, False], b"2", False), (caches[kind, True], b"3", True)):
            schema = pq.read_schema(cache / "data" / "part-00000.parquet")
            assert schema.metadata[b"kdcache_format_version"] == version
            assert ("soft_mask" in schema.names) == mask
        # Selection stores fewer bytes per corpus token.
        assert m3["totals"]["bytes"] < 0.6 * m2["totals"]["bytes"]


def test_stream_batches_pad_unselected_targets(caches):
    for kind in KINDS:
        full = list(CacheStream(caches[kind, False], batch_size=8, shuffle=False))
        sel = list(CacheStream(caches[kind, True], batch_size=8, shuffle=False))
        assert len(full) == len(sel)
        for a, b in zip(full, sel):
            mask = b["soft_mask"]
            assert "soft_mask" not in a and mask.dtype == torch.bool and mask.shape == a["labels"].shape
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["target_positions"], b["target_positions"])
            width = b["target_ids"].shape[1]
            assert b["target_head"] == a["target_head"]
            for key in ("target_ids", "target_logprobs", "target_counts"):
                assert torch.equal(b[key][mask], a[key][mask][:, :width])
            assert (b["target_logprobs"][~mask] == float("-inf")).all()
            assert (b["target_counts"][~mask] == 0).all() and (b["target_ids"][~mask] == 0).all()
    # --alpha 0 reads neither the soft targets nor soft_mask.
    batch = next(iter(CacheStream(caches["sample", True], batch_size=4, soft_targets=False)))
    assert not {"target_ids", "target_logprobs", "target_counts", "soft_mask"} & batch.keys()


def _batch(n=12, v=30, width=5, seed=0):
    """A synthetic top-k+sample-like batch: head of 2, draws with counts summing to 8."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:width] for _ in range(n)]).int()
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1).gather(1, ids.long())
    lp, order = lp.sort(-1, descending=True)
    ids = ids.gather(1, order)
    counts = torch.zeros(n, width, dtype=torch.int16)
    counts[:, 2:] = torch.tensor([4, 3, 1], dtype=torch.int16)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -1
    return {"target_ids": ids, "target_logprobs": lp.half(), "target_counts": counts, "target_head": 2, "labels": labels}


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_loss_per_target_alpha(alpha):
    """The per-position weighting. All selected: today's loss. An unselected target: its gradient is the CE-only gradient
    (F.cross_entropy, independently), a selected one's is today's."""
    batch = _batch()
    n, v = batch["labels"].shape[0], 30
    z0 = torch.randn(n, v, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = DistillLoss(alpha=alpha, selection="per-position")

    def run(b):
        z = z0.clone().requires_grad_(True)
        out = loss(z, lambda h: h, b)
        out.loss.backward()
        return out, z.grad

    today, g_today = run(batch)
    all_true, g_all = run({**batch, "soft_mask": torch.ones(n, dtype=torch.bool)})
    assert torch.allclose(today.loss, all_true.loss, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_today, g_all, rtol=1e-12, atol=1e-14)
    assert torch.allclose(today.kd, all_true.kd) and torch.allclose(today.hard, all_true.hard)

    mask = torch.ones(n, dtype=torch.bool)
    mask[[0, 3, 5, 6]] = False  # 3 is unlabelled: no gradient at all
    padded = dict(batch, soft_mask=mask)
    padded["target_ids"] = torch.where(mask[:, None], batch["target_ids"], 0)
    padded["target_logprobs"] = torch.where(mask[:, None], batch["target_logprobs"], float("-inf"))
    padded["target_counts"] = torch.where(mask[:, None], batch["target_counts"], 0)
    out, g = run(padded)
    labelled = int((batch["labels"] >= 0).sum())
    for i in range(n):
        if mask[i]:
            assert torch.allclose(g[i], g_today[i], rtol=1e-10, atol=1e-14)
        elif batch["labels"][i] >= 0:
            z = z0[i].clone().requires_grad_(True)
            F.cross_entropy(z[None], batch["labels"][i:i + 1]).backward()
            assert torch.allclose(g[i], z.grad / labelled, rtol=1e-10, atol=1e-14)
        else:
            assert (g[i] == 0).all()
    assert torch.isfinite(out.loss) and math.isfinite(float(out.kd))
    # Reported: the CE over every label (as today), the KD over the selected targets.
    assert torch.allclose(out.hard, today.hard)
    # The output layer in chunks of 5 targets (under checkpointing) gives the same loss and gradient.
    z = z0.clone().requires_grad_(True)
    chunked = DistillLoss(alpha=alpha, chunk_elements=5 * v, selection="per-position")(z, lambda h: h, padded)
    chunked.loss.backward()
    assert torch.allclose(chunked.loss, out.loss, rtol=1e-12) and torch.allclose(z.grad, g, rtol=1e-10, atol=1e-15)

    # The piece-by-piece API (README): with soft_mask, the KD sum is over the selected rows, the CE over all.
    from kdcache.train.losses import sparse_kd_and_ce
    kd, ce = sparse_kd_and_ce(z0, batch["labels"], padded)
    kd_sel, _ = sparse_kd_and_ce(z0[mask], batch["labels"][mask], {k: v[mask] if torch.is_tensor(v) else v
                                                                   for k, v in batch.items()})
    _, ce_all = sparse_kd_and_ce(z0, batch["labels"])
    assert torch.allclose(kd, kd_sel) and torch.allclose(ce, ce_all)

    # The rest-bucket tail (top-k targets) follows the same rule with plain autograd.
    if alpha == 0.5:
        topk = {"target_ids": padded["target_ids"][:, :2], "target_logprobs": padded["target_logprobs"][:, :2],
                "labels": batch["labels"], "soft_mask": mask}
        z = z0.clone().requires_grad_(True)
        DistillLoss(alpha=alpha, tail="bucket", selection="per-position")(z, lambda h: h, topk).loss.backward()
        assert torch.isfinite(z.grad).all()
        for i in np.flatnonzero(~mask.numpy()):
            if batch["labels"][i] >= 0:
                ref = z0[i].clone().requires_grad_(True)
                F.cross_entropy(ref[None], batch["labels"][i:i + 1]).backward()
                assert torch.allclose(z.grad[i], ref.grad / labelled, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("weighting", ["kd-share", "per-position", "selected-only"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_selection_weightings_match_their_formulas(weighting, alpha):
    """Each DistillLoss(selection=...) against its formula, computed independently: the KD of each
    selected target from its own unselected row (sparse_kd_and_ce), the CE from F.cross_entropy; loss
    and gradient. Every target selected: the loss without selection, for every weighting."""
    from kdcache.train.losses import sparse_kd_and_ce
    batch = _batch()
    labels, n, v = batch["labels"], batch["labels"].shape[0], 30
    z0 = torch.randn(n, v, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = DistillLoss(alpha=alpha, selection=weighting)
    plain = DistillLoss(alpha=alpha)(z0, lambda h: h, batch).loss
    every = loss(z0, lambda h: h, {**batch, "soft_mask": torch.ones(n, dtype=torch.bool)}).loss
    assert torch.allclose(every, plain, rtol=1e-12)

    mask = torch.ones(n, dtype=torch.bool)
    mask[[0, 3, 5, 6, 9]] = False  # 3 is unlabelled
    padded = dict(batch, soft_mask=mask)
    for key, fill in (("target_ids", 0), ("target_logprobs", float("-inf")), ("target_counts", 0)):
        padded[key] = torch.where(mask[:, None], batch[key], fill)
    z = z0.clone().requires_grad_(True)
    out = loss(z, lambda h: h, padded)
    out.loss.backward()

    zr = z0.clone().requires_grad_(True)
    kd = torch.stack([sparse_kd_and_ce(zr[i:i + 1], labels[i:i + 1],
                                       {k: x[i:i + 1] if torch.is_tensor(x) else x for k, x in batch.items()})[0]
                      for i in torch.nonzero(mask).flatten().tolist()])
    known = labels >= 0
    ce = F.cross_entropy(zr, labels.clamp(min=0), reduction="none") * known
    if weighting == "per-position":
        expected = alpha * kd.sum() / n + ((1 - alpha) * ce[mask].sum() + ce[~mask].sum()) / known.sum()
    elif weighting == "kd-share":
        expected = alpha * kd.mean() + (1 - alpha) * ce.sum() / known.sum()
    else:
        expected = alpha * kd.mean() + (1 - alpha) * ce[mask].sum() / (known & mask).sum()
    expected.backward()
    assert torch.allclose(out.loss, expected, rtol=1e-10)
    assert torch.allclose(z.grad, zr.grad, rtol=1e-8, atol=1e-14)
    if weighting == "selected-only" or alpha == 1.0 and weighting == "kd-share":
        assert (z.grad[~mask] == 0).all()  # an unselected target trains nothing
    # Reported the same way for every weighting: KD over the selected, CE over every label.
    assert torch.allclose(out.kd, kd.mean().detach()) and torch.allclose(out.hard, (ce.sum() / known.sum()).detach())
    # The rest-bucket path (top-k heads) applies the same CE weights.
    topk = {"target_ids": padded["target_ids"][:, :2], "target_logprobs": padded["target_logprobs"][:, :2],
            "labels": labels, "soft_mask": mask}
    zb = z0.clone().requires_grad_(True)
    bucket = DistillLoss(alpha=alpha, tail="bucket", selection=weighting)(zb, lambda h: h, topk)
    bucket.loss.backward()
    assert torch.isfinite(bucket.loss) and torch.isfinite(zb.grad).all()
    if weighting == "selected-only":
        assert (zb.grad[~mask] == 0).all()
    with pytest.raises(ValueError, match="selection must be one of"):
        DistillLoss(selection="sometimes")


def test_resume_keeps_the_selection_weighting(caches, tmp_path, capsys):
    """The weighting is part of a run: resuming with another is refused in one line; a checkpoint from before
    the option (no weighting recorded) was weighed per position and resumes as such."""
    from kdcache.train.checkpoint import find_checkpoint
    cache = caches["top-k+sample", True]
    out = tmp_path / "run"
    args = ["train-student", "--cache", cache, "--student", "L2-H128", "--layers", 1, "--hidden", 16, "--heads", 2,
            "--intermediate", 32, "--max-steps", 3, "--batch-size", 4, "--num-workers", 0, "--no-progress",
            "--out", out]
    code, _, err = run_cli(args + ["--selection-weighting", "selected-only", "--stop-after-steps", 1], capsys)
    assert code == 0, err
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code != 0 and "selection_weighting='selected-only'" in err and one_line_error(err), err
    meta = find_checkpoint(out) / "meta.json"
    saved = json.loads(meta.read_text())
    del saved["identity"]["selection_weighting"]  # as written before the option existed
    meta.write_text(json.dumps(saved))
    code, _, err = run_cli(args + ["--resume", "--selection-weighting", "selected-only"], capsys)
    assert code != 0 and "selection_weighting='per-position'" in err, err
    code, _, err = run_cli(args + ["--resume", "--selection-weighting", "per-position"], capsys)
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3


def test_verify_inspect_train_evaluate(caches, tmp_path, capsys):
    cache = caches["top-k+sample", True]
    code, out, err = run_cli(["verify", cache], capsys)
    assert code == 0 and out.startswith("ok:"), err
    code, out, _ = run_cli(["inspect", cache, "--json"], capsys)
    stats = json.loads(out)
    m = manifest(cache)
    selected = sum(sum(r["soft_mask"]) for r in read_rows(cache))
    assert stats["select_positions"] == FRACTION and stats["selected_positions"] == selected
    assert stats["bytes_per_corpus_token"] == pytest.approx(m["totals"]["bytes"] / m["totals"]["positions"], abs=0.01)
    assert stats["bytes_per_selected_position"] == pytest.approx(m["totals"]["bytes"] / selected, abs=0.01)
    code, out, _ = run_cli(["inspect", cache], capsys)
    assert "bytes per corpus token" in out and "bytes per selected position" in out

    student = tmp_path / "student"
    args = ["train-student", "--cache", cache, "--student", "L2-H128", "--layers", 1, "--hidden", 16, "--heads", 2,
            "--intermediate", 32, "--max-steps", 3, "--batch-size", 4, "--num-workers", 0, "--no-progress"]
    code, _, err = run_cli(args + ["--out", student], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(x["kd_loss"]) and math.isfinite(x["loss"]) for x in metrics if "loss" in x)

    code, out, err = run_cli(["evaluate", "--model", student, "--cache", cache, "--json"], capsys)
    assert code == 0, err
    sel = json.loads(out)
    code, out, err = run_cli(["evaluate", "--model", student, "--cache", caches["top-k+sample", False], "--json"], capsys)
    full = json.loads(out)
    assert sel["soft_positions"] == selected and full["soft_positions"] == full["positions"] == sel["positions"]
    assert sel["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)  # every label, in both
    assert sel["teacher_accuracy"] is None and full["teacher_accuracy"] is not None
    assert math.isfinite(sel["kl"]) and sel["kl"] != full["kl"]
    code, out, _ = run_cli(["evaluate", "--model", student, "--cache", cache], capsys)
    assert "KL and top-1 agreement over those only" in out


def _tamper(cache, edit):
    from kdcache.cache.shards import write_shard
    import pyarrow as pa

    table = pq.read_table(cache / "data" / "part-00000.parquet")
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    edit(columns)
    stats = write_shard(cache, 0, pa.table(columns, schema=table.schema))
    m = manifest(cache)
    m["shards"][0] = stats
    (cache / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    ("count", "a row selects 8 of its 32 positions, --select-positions 0.2 keeps 7"),
    ("length", "soft_mask does not have one entry per position"),
    ("soft", "sample_lengths does not have one entry per selected position"),
    ("head", "topk_ids does not have one entry per selected position"),
])
def test_verify_and_the_stream_catch_a_tampered_selection(caches, tmp_path, capsys, damage, message):
    cache = tmp_path / "cache"
    shutil.copytree(caches["top-k+sample", True], cache)

    def edit(c):
        mask = c["soft_mask"][0]
        assert len(mask) == 32 and sum(mask) == 7
        if damage == "count":
            mask[mask.index(False)] = True
        elif damage == "length":
            mask.append(False)
        elif damage == "soft":  # one soft position too many in the kind's per-position columns
            c["sample_lengths"][0].append(0)
        else:
            c["topk_ids"][0].append(c["topk_ids"][0][0])
            c["topk_logprobs"][0].append(c["topk_logprobs"][0][0])
    _tamper(cache, edit)
    code, _, err = run_cli(["verify", cache], capsys)
    assert code != 0 and message in err and "part-00000" in err and one_line_error(err), err
    from kdcache.errors import KdcacheError
    with pytest.raises(KdcacheError, match="part-00000"):  # the stream's read-time checks refuse it too
        list(CacheStream(cache, batch_size=4, shuffle=False))


def test_mlm_selection(tiny_bert_mlm, shakespeare_txt, tmp_path, capsys):
    cache = tmp_path / "mlm"
    dump(tiny_bert_mlm, shakespeare_txt, cache, *COMMON, "--top-k", 4, "--select-positions", 0.5)
    assert manifest(cache)["format_version"] == 3
    rows = read_rows(cache)
    for r in rows:
        n = len(r["positions"])
        assert len(r["soft_mask"]) == n and sum(r["soft_mask"]) == math.ceil(n / 2)
        assert len(r["topk_ids"]) == sum(r["soft_mask"])
    code, out, err = run_cli(["verify", cache], capsys)
    assert code == 0, err
    batch = next(iter(CacheStream(cache, batch_size=8, shuffle=False)))
    assert batch["soft_mask"].sum() < batch["labels"].shape[0]
    out = DistillLoss(alpha=0.5)(torch.randn(len(batch["labels"]), 400, dtype=torch.float64), lambda h: h, batch)
    assert torch.isfinite(out.loss)


def test_identity_resume_and_refusals(caches, tiny_llama_clm, tiny_bert_cls, shakespeare_txt, sms_csv, tmp_path, capsys):
    cache = caches["sample", True]
    before = manifest(cache)
    # The same command again: nothing to do, the cache is unchanged.
    dump(tiny_llama_clm, shakespeare_txt, cache, *COMMON, *KINDS["sample"], "--select-positions", FRACTION, capsys=capsys)
    assert manifest(cache)["shards"] == before["shards"]
    # Another fraction, or none, into the same --out is another cache: refused, naming what differs.
    for extra in (["--select-positions", 0.3], []):
        code, _, err = dump(tiny_llama_clm, shakespeare_txt, cache, *COMMON, *KINDS["sample"], *extra,
                            capsys=capsys, check=False)
        assert code != 0 and "targets.select_positions" in err and one_line_error(err), err
        assert manifest(cache) == manifest(cache) and manifest(cache)["shards"] == before["shards"]
    cases = [
        ([tiny_llama_clm, shakespeare_txt, "--select-positions", 0], "--select-positions must be in (0, 1]"),
        ([tiny_llama_clm, shakespeare_txt, "--select-positions", 1.5], "--select-positions must be in (0, 1]"),
        ([tiny_llama_clm, shakespeare_txt, "--select-positions", 0.1234567], "more than 6 decimals"),
        ([tiny_bert_cls, sms_csv, "--label-column", "label", "--select-positions", 0.5], "--task seq-cls"),
    ]
    for (teacher, data, *extra), message in cases:
        code, _, err = dump(teacher, data, tmp_path / "refused", *extra, capsys=capsys, check=False)
        assert code != 0 and message in err and one_line_error(err), err
        assert not (tmp_path / "refused").exists()
    code, out, _ = dump(tiny_llama_clm, shakespeare_txt, tmp_path / "dry", *COMMON, *KINDS["sample"],
                        "--select-positions", FRACTION, "--dry-run", capsys=capsys)
    positions = before["totals"]["positions"]
    assert f"soft targets at {sum(sum(r['soft_mask']) for r in read_rows(cache)):,} of them" in out
    assert f"{positions:,} target positions" in out


def test_format_md_recipe_rebuilds_a_selected_caches_weights(caches):
    """docs/FORMAT.md's pandas recipe (the version-3 form, with soft_mask) gives each selected position the
    weights the loss trains with, and says which positions have none; on a v2 cache it is the v2 recipe."""
    import pandas as pd

    from kdcache.train.losses import sparse_target_weights

    for (kind, selected), cache in caches.items():
        targets = manifest(cache)["targets"]
        n = targets["samples"]
        df = pd.read_parquet(cache / "data").sort_values("example_id")
        rebuilt = []  # per target: {id: weight}, or None where the row has no soft target
        for _, row in df.iterrows():  # FORMAT.md, "Reading a cache"
            chosen = (np.flatnonzero(row["soft_mask"]) if "soft_mask" in row else np.arange(len(row["positions"])))
            assert ("soft_mask" in row) == selected
            split = np.cumsum(row["sample_lengths"])[:-1]
            sample_ids, sample_counts = np.split(row["sample_ids"], split), np.split(row["sample_counts"], split)
            per_position = [None] * len(row["positions"])
            for j, p in enumerate(chosen):
                ids, counts = sample_ids[j], sample_counts[j].astype(np.float64)
                if targets["kind"] == "sample":
                    weights = {int(i): c / n for i, c in zip(ids, counts)}
                else:
                    head_p = np.exp(row["topk_logprobs"][j].astype(np.float64))
                    tail = max(0.0, 1.0 - head_p.sum())
                    weights = {int(i): float(w) for i, w in zip(row["topk_ids"][j], head_p)}
                    weights.update({int(i): tail * c / n for i, c in zip(ids, counts)})
                per_position[p] = weights
            rebuilt += per_position
        from_loss = []
        for batch in CacheStream(cache, batch_size=8, shuffle=False):
            w, _ = sparse_target_weights(batch["target_logprobs"].double(), batch["target_counts"], batch["target_head"], 1.0)
            mask = batch.get("soft_mask", torch.ones(len(w), dtype=torch.bool))
            for ids, ws, m in zip(batch["target_ids"].tolist(), w.tolist(), mask.tolist()):
                from_loss.append({i: x for i, x in zip(ids, ws) if x > 0} if m else None)
        assert len(rebuilt) == len(from_loss) == manifest(cache)["totals"]["positions"]
        for a, b in zip(rebuilt, from_loss):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-9 for i in a)


def test_chat_rows_top_k_and_batching_independence(tmp_path_factory, capsys):
    """Chat rows (assistant spans: positions with gaps), the top-k kind: the selection and its soft targets
    do not depend on how rows are batched, and equal the unselected dump's at the selected positions."""
    from chat_helpers import CHATML_SMOLLM2, CONVERSATIONS, chat_teacher, train_chat_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("chat_select")
    teacher = chat_teacher(root / "teacher", train_chat_tokenizer(), CHATML_SMOLLM2)
    data = write_jsonl(root / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    caches = {}
    for name, extra in (("full", []), ("selected", ["--select-positions", 0.3]),
                        ("batched", ["--select-positions", 0.3, "--max-tokens-per-batch", 96])):
        caches[name] = root / name
        dump(teacher, data, caches[name], "--top-k", 4, *extra, capsys=capsys)
    full, sel, batched = (read_rows(caches[name]) for name in ("full", "selected", "batched"))
    assert len(sel) == len(CONVERSATIONS)
    for a, b, c in zip(full, sel, batched):
        assert b["soft_mask"] == c["soft_mask"]
        np.testing.assert_array_equal(b["topk_ids"], c["topk_ids"])
        np.testing.assert_array_equal(b["topk_logprobs"], c["topk_logprobs"])
        mask = np.array(b["soft_mask"], dtype=bool)
        assert mask.sum() == math.ceil(Fraction(3, 10) * len(b["positions"]))
        np.testing.assert_array_equal(b["topk_ids"], a["topk_ids"][mask])
        np.testing.assert_array_equal(b["topk_logprobs"], a["topk_logprobs"][mask])
    code, _, err = run_cli(["verify", caches["batched"]], capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", list(KINDS))
def test_selection_with_counts_only_draws(caches, kind, tiny_llama_clm, shakespeare_txt, tmp_path, capsys):
    """Both version-3 features at once (--select-positions with --no-draw-logprobs): the same soft_mask, ids
    and counts as the selected cache with log-probs, no sample_logprobs, verify passes, and training at T = 1
    takes the same steps (the logged hard loss, which the log-probs cannot touch, equal at every line)."""
    both = tmp_path / "both"
    dump(tiny_llama_clm, shakespeare_txt, both, *COMMON, *KINDS[kind],
         "--select-positions", FRACTION, "--no-draw-logprobs", capsys=capsys)
    m = manifest(both)
    assert m["format_version"] == 3 and m["targets"]["draw_logprobs"] is False
    assert m["targets"]["select_positions"] == FRACTION
    with_lp, counts_only = read_rows(caches[kind, True]), read_rows(both)
    assert "sample_logprobs" not in counts_only[0] and "sample_logprobs" in with_lp[0]
    for a, b in zip(with_lp, counts_only, strict=True):
        for column in ("soft_mask", "positions", "labels", "sample_ids", "sample_counts", "sample_lengths"):
            assert list(a[column]) == list(b[column]), column
    code, out, err = run_cli(["verify", both], capsys)
    assert code == 0 and out.startswith("ok:"), err

    losses = {}
    for name, cache in (("with", caches[kind, True]), ("counts", both)):
        student = tmp_path / name
        code, _, err = run_cli(["train-student", "--cache", cache, "--student", "L2-H128", "--layers", 1, "--hidden", 16,
                                "--heads", 2, "--intermediate", 32, "--max-steps", 4, "--batch-size", 4, "--log-every", 1,
                                "--num-workers", 0, "--no-progress", "--out", student], capsys)
        assert code == 0, err
        losses[name] = [json.loads(line)["hard_loss"] for line in (student / "metrics.jsonl").read_text().splitlines()
                        if "hard_loss" in json.loads(line)]
    assert len(losses["with"]) == 4 and losses["with"] == pytest.approx(losses["counts"], rel=1e-6)
