"""Sampled target kinds through the real commands: dump-logits → verify/inspect → stream → loss
and evaluate, checked against a direct teacher forward; batching independence; format v1 caches
still load everywhere; bad inputs and damaged caches are refused with one-line errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dump_helpers import assert_same_rows, dump, manifest, read_rows, run_cli
from kdcache.cache.shards import write_shard
from kdcache.cache.stream import CacheStream
from kdcache.train.forward import target_logits
from kdcache.train.losses import DistillLoss

COMMON = ["--max-length", 32, "--shard-rows", 16]
KINDS = {
    "top-k": ["--targets", "top-k", "--top-k", 4],
    "sample": ["--targets", "sample", "--samples", 32],
    "top-k+sample": ["--targets", "top-k+sample", "--top-k", 4, "--samples", 32],
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_clm, shakespeare_txt) -> dict:
    root = tmp_path_factory.mktemp("sampled")
    out = {}
    for kind, args in KINDS.items():
        out[kind] = root / kind
        dump(tiny_llama_clm, shakespeare_txt, out[kind], *COMMON, *args)
    return out


def one_line_error(stderr: str) -> bool:
    """One `error: ...` line and no traceback (progress bars may share stderr)."""
    return "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line.lower()]) == 1


def teacher_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_cached_gradient_matches_online_kd_on_a_real_dump(caches, tiny_llama_clm):
    """Averaged over every position of a real cache, (cached KD gradient - online full-softmax KD
    gradient) is zero within a few standard errors for the sampled kinds, far from it for top-k.
    The stored log-probs are the teacher's own, and each position's draws add up to N."""
    teacher = teacher_model(tiny_llama_clm)
    errors, spreads = {}, {}
    for kind, cache in caches.items():
        diffs = []
        for batch in CacheStream(cache, batch_size=8, shuffle=False):
            with torch.no_grad():
                t_logits = target_logits(teacher, "clm", batch).double()
            lp = batch["target_logprobs"].float()
            stored = lp > float("-inf")
            at_ids = t_logits.log_softmax(-1).gather(1, batch["target_ids"].long())
            assert torch.allclose(lp[stored], at_ids[stored].float(), atol=0.01)
            if kind != "top-k":
                assert (batch["target_counts"].sum(1) == 32).all()
            student = torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(len(diffs)),
                                  dtype=torch.float64)
            grads = []
            for online in (False, True):
                z = student.clone().requires_grad_(True)
                loss = DistillLoss(alpha=1.0)(z, lambda h: h, batch, teacher_logits=t_logits if online else None)
                loss.loss.backward()
                grads.append(z.grad * len(z))
            diffs.append(grads[0] - grads[1])  # = p - w per target: the estimator's error
        d = torch.cat(diffs)
        errors[kind] = d.mean(0)
        spreads[kind] = d.std(0) / len(d) ** 0.5
    for kind in ("sample", "top-k+sample"):
        z = errors[kind].abs() / spreads[kind].clamp(min=1e-9)
        assert z.max() < 5.5, (kind, float(z.max()))
    # Top-4 of a near-uniform teacher drops almost all of it: the bias is far outside the noise.
    assert (errors["top-k"].abs() / spreads["sample"].clamp(min=1e-9)).max() > 50


def test_evaluate_estimates_the_full_kl(caches, tiny_llama_clm, tmp_path):
    """evaluate's KL on a sampled cache is an unbiased estimate of the full-vocabulary KL, and the
    teacher against its own cache scores ~0."""
    from transformers import LlamaForCausalLM

    from kdcache.train.evaluate import evaluate

    teacher = teacher_model(tiny_llama_clm)
    torch.manual_seed(1)
    LlamaForCausalLM(teacher.config).save_pretrained(tmp_path / "other")
    other = teacher_model(tmp_path / "other")
    for kind in ("sample", "top-k+sample"):
        exact, estimates = [], []
        for batch in CacheStream(caches[kind], batch_size=8, shuffle=False):
            with torch.no_grad():
                log_p = target_logits(teacher, "clm", batch).double().log_softmax(-1)
                log_q = target_logits(other, "clm", batch).double().log_softmax(-1)
            exact.append((log_p.exp() * (log_p - log_q)).sum(-1))
            # The estimator, by FORMAT.md's weights: head p_i, drawn ids (tail mass) x count / N.
            ids, lp = batch["target_ids"].long(), batch["target_logprobs"].double()
            head = batch["target_head"]
            tail = 1 - lp[:, :head].exp().sum(-1, keepdim=True)
            w = torch.cat([lp[:, :head].exp(), tail * batch["target_counts"][:, head:].double() / 32], 1)
            terms = torch.where(w > 0, w * (lp - log_q.gather(1, ids)), 0.0)
            estimates.append(terms.sum(-1))
        exact, estimates = torch.cat(exact), torch.cat(estimates)
        got = evaluate(tmp_path / "other", caches[kind])
        assert got["targets"] == kind
        assert got["kl"] == pytest.approx(float(estimates.mean()), rel=1e-4)
        assert abs(float(estimates.mean()) - float(exact.mean())) < 5 * float(estimates.std()) / len(exact) ** 0.5
        own = evaluate(tiny_llama_clm, caches[kind])
        assert abs(own["kl"]) < 2e-3  # fp16 rounding of the stored log-probs only
    assert evaluate(tiny_llama_clm, caches["top-k+sample"])["top1_agreement"] > 0.99


def test_batching_does_not_change_a_sampled_cache(caches, tiny_llama_clm, shakespeare_txt, tmp_path):
    for kind in ("sample", "top-k+sample"):
        other = tmp_path / kind
        dump(tiny_llama_clm, shakespeare_txt, other, *COMMON, *KINDS[kind], "--batch-size", 3)
        assert_same_rows(read_rows(other), read_rows(caches[kind]))
        assert [s["sha256"] for s in manifest(other)["shards"]] == [s["sha256"] for s in manifest(caches[kind])["shards"]]


def test_verify_inspect_and_the_manifest(caches, capsys):
    m = manifest(caches["top-k+sample"])
    assert m["format_version"] == 2 and m["targets"] == {"kind": "top-k+sample", "k": 4, "samples": 32}
    assert manifest(caches["sample"])["targets"] == {"kind": "sample", "k": 0, "samples": 32}
    for kind, cache in caches.items():
        code, out, err = run_cli(["verify", cache], capsys)
        assert code == 0 and out.startswith("ok:"), err
        code, out, _ = run_cli(["inspect", cache, "--json"], capsys)
        stats = json.loads(out)
        assert stats["targets"] == kind
        rows = read_rows(cache)
        if kind != "top-k":
            per_position = [n for r in rows for n in r["sample_lengths"]]
            assert sum(per_position) == sum(len(r["sample_ids"]) for r in rows)
            head = 4 if kind == "top-k+sample" else 0
            assert stats["mean_ids_per_position"] == pytest.approx(head + np.mean(per_position), abs=1e-3)
        if kind != "sample":
            mass = np.concatenate([np.exp(r["topk_logprobs"].astype(np.float64)).sum(1) for r in rows]).mean()
            assert stats["mean_topk_mass"] == pytest.approx(mass, abs=1e-5)
            assert stats["mean_tail_mass"] == pytest.approx(1 - mass, abs=1e-5)
        assert stats["bytes_per_position"] == pytest.approx(manifest(cache)["totals"]["bytes"] / stats["positions"], abs=0.01)


def tamper(cache: Path, edit) -> None:
    """Rewrite shard 0 with `edit` applied to its columns (python lists), re-recording its
    checksum so that only the content check can catch it."""
    table = pq.read_table(cache / "data" / "part-00000.parquet")
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    edit(columns)
    table = pa.table(columns, schema=table.schema)
    stats = write_shard(cache, 0, table)
    m = manifest(cache)
    m["shards"][0] = stats
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    (cache / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    ("count", "draw counts sum to 33"),
    ("duplicate", "appears twice"),
    ("head", "repeats one of its position's top-k ids"),
    ("range", ">= target_vocab_size"),
    ("lengths", "does not have sum(sample_lengths) entries"),
])
def test_verify_catches_bad_draws(caches, tmp_path, capsys, damage, message):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(caches["top-k+sample"], cache)

    def edit(c):  # row 0's entries; its first position's come first (sample_lengths[0][0] of them, >= 2 here)
        ids, counts = c["sample_ids"][0], c["sample_counts"][0]
        assert c["sample_lengths"][0][0] >= 2
        if damage == "count":
            counts[0] += 1
        elif damage == "duplicate":
            ids[1] = ids[0]
        elif damage == "head":
            ids[0] = c["topk_ids"][0][0][0]
        elif damage == "lengths":
            c["sample_lengths"][0][0] += 1
        else:
            ids[0] = 60000
    tamper(cache, edit)
    code, _, err = run_cli(["verify", cache], capsys)
    assert code != 0 and message in err and "part-00000" in err and one_line_error(err)
    if damage == "lengths":  # the stream, which trusts the checksums, still refuses to misalign the entries
        from kdcache.errors import KdcacheError
        with pytest.raises(KdcacheError, match="sample_lengths"):
            list(CacheStream(cache, batch_size=4, shuffle=False))


def test_train_evaluate_and_refusals(caches, tmp_path, capsys):
    cache = caches["sample"]
    # --alpha 0 streams no soft targets at all.
    batch = next(iter(CacheStream(cache, batch_size=4, soft_targets=False)))
    assert not {"target_ids", "target_logprobs", "target_counts"} & batch.keys()
    out = tmp_path / "student"
    args = ["train-student", "--cache", cache, "--student", "L2-H128", "--layers", 1, "--hidden", 16, "--heads", 2,
            "--intermediate", 32, "--max-steps", 2, "--batch-size", 4, "--num-workers", 0, "--no-progress"]
    code, _, err = run_cli(args + ["--out", out], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["kd_loss"]) for m in metrics)
    code, _, err = run_cli(args + ["--out", tmp_path / "bucket", "--tail", "bucket"], capsys)
    assert code != 0 and "--tail bucket" in err and "sample targets" in err
    assert not (tmp_path / "bucket").exists()
    code, out_text, err = run_cli(["evaluate", "--model", out, "--cache", cache], capsys)
    assert code == 0 and "sample targets" in out_text, err


def test_dump_refusals_and_identity(caches, tiny_llama_clm, tiny_bert_cls, shakespeare_txt, sms_csv, tmp_path, capsys):
    cases = [
        ([tiny_llama_clm, shakespeare_txt, "--targets", "sample", "--samples", 0], "--samples must be within"),
        ([tiny_llama_clm, shakespeare_txt, "--targets", "top-k+sample", "--top-k", 10**6], "--top-k"),
        ([tiny_bert_cls, sms_csv, "--targets", "sample", "--label-column", "label"], "sequence-classification"),
    ]
    for (teacher, data, *extra), message in cases:
        code, _, err = dump(teacher, data, tmp_path / "refused", *extra, capsys=capsys, check=False)
        assert code != 0 and message in err and one_line_error(err), err
        assert not (tmp_path / "refused").exists()
    # Another N into an existing cache is another cache: refused, naming what differs.
    before = manifest(caches["sample"])
    code, _, err = dump(tiny_llama_clm, shakespeare_txt, caches["sample"], *COMMON, "--targets", "sample",
                        "--samples", 8, capsys=capsys, check=False)
    assert code != 0 and "targets.samples" in err
    assert manifest(caches["sample"]) == before
    code, out, _ = dump(tiny_llama_clm, shakespeare_txt, tmp_path / "dry", *COMMON, *KINDS["top-k+sample"], "--dry-run",
                        capsys=capsys)
    assert "at most" in out and "top-4 + 32 samples" in out


def as_version_1(src: Path, dst: Path) -> Path:
    """A cache exactly as format version 1 wrote it (docs/FORMAT.md v1): the top-k columns, schema
    metadata "1", a manifest without `targets`."""
    import shutil

    shutil.copytree(src, dst)
    m = manifest(dst)
    v1_types = {"topk_ids": pa.list_(pa.list_(pa.uint16(), 4)), "topk_logprobs": pa.list_(pa.list_(pa.float16(), 4))}
    for i, entry in enumerate(m["shards"]):
        table = pq.read_table(dst / entry["file"])
        assert table.column_names == ["example_id", "input_ids", "positions", "topk_ids", "topk_logprobs", "labels"]
        for name, typ in v1_types.items():
            assert table.schema.field(name).type == typ
        table = table.replace_schema_metadata({"kdcache_format_version": "1"})
        m["shards"][i] = write_shard(dst, entry["index"], table)
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    m["format_version"] = 1
    del m["targets"]
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_version_1_caches_still_work_and_unknown_versions_are_refused(caches, tmp_path, capsys):
    v1 = as_version_1(caches["top-k"], tmp_path / "v1")
    code, out, err = run_cli(["verify", v1], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["inspect", v1, "--json"], capsys)
    assert json.loads(out)["targets"] == "top-k" and json.loads(out)["format_version"] == 1
    student = tmp_path / "student"
    code, _, err = run_cli(["train-student", "--cache", v1, "--student", "L2-H128", "--layers", 1, "--hidden", 16,
                            "--heads", 2, "--intermediate", 32, "--max-steps", 2, "--batch-size", 4,
                            "--num-workers", 0, "--no-progress", "--out", student], capsys)
    assert code == 0, err
    code, out, err = run_cli(["evaluate", "--model", student, "--cache", v1, "--json"], capsys)
    assert code == 0 and json.loads(out)["kl"] > 0, err

    m = manifest(v1)
    m["format_version"] = 4  # a newer kdcache's (3 is read since --no-draw-logprobs)
    (v1 / "manifest.json").write_text(json.dumps(m))
    for args in (["verify", v1], ["inspect", v1], ["evaluate", "--model", student, "--cache", v1],
                 ["train-student", "--cache", v1, "--student", "L2-H128", "--out", tmp_path / "s3"]):
        code, _, err = run_cli(args, capsys)
        assert code != 0 and "format version 4" in err and one_line_error(err), (args, err)


def test_sweep_and_report_on_sampled_caches(caches, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["sweep", "--cache", caches["top-k+sample"], "--students", "L2-H128", "--out", runs,
                            "--max-steps", 2, "--batch-size", 4, "--num-workers", 0], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", runs, "--eval-cache", caches["sample"]], capsys)
    assert code == 0, err
    md = (runs / "report.md").read_text()
    assert "32 samples targets" in md and "estimated without bias" in md
    code, out, _ = run_cli(["evaluate", "--model", runs / "L2-H128", "--cache", caches["sample"], "--json"], capsys)
    kl = json.loads(out)["kl"]
    row = next(line for line in md.splitlines() if line.startswith("| ") and "L2-H128" in line)
    assert f"{kl:.4f}" in row


def test_weights_rebuilt_from_format_md_alone_match_the_loss(caches, tmp_path):
    """docs/FORMAT.md's recipe (pandas, and `datasets` reading the same columns) gives each position
    the weights the loss trains with."""
    import datasets
    import pandas as pd

    from kdcache.train.losses import sparse_target_weights

    for kind in ("sample", "top-k+sample"):
        cache = caches[kind]
        m = manifest(cache)
        n = m["targets"]["samples"]
        df = pd.read_parquet(cache / "data").sort_values("example_id")
        hf = datasets.load_dataset("parquet", data_files=str(cache / "data" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
        assert {"sample_lengths", "sample_ids", "sample_logprobs", "sample_counts"} <= set(hf.column_names)
        rebuilt = []  # FORMAT.md, "Reading a cache", row by row
        for _, row in df.iterrows():
            split = np.cumsum(row["sample_lengths"])[:-1]
            sample_ids, sample_counts = np.split(row["sample_ids"], split), np.split(row["sample_counts"], split)
            for p in range(len(row["positions"])):
                ids, counts = sample_ids[p], sample_counts[p].astype(np.float64)
                if kind == "sample":
                    weights = {int(i): c / n for i, c in zip(ids, counts)}
                else:
                    head_p = np.exp(row["topk_logprobs"][p].astype(np.float64))
                    tail = max(0.0, 1.0 - head_p.sum())
                    weights = {int(i): float(w) for i, w in zip(row["topk_ids"][p], head_p)}
                    weights.update({int(i): tail * c / n for i, c in zip(ids, counts)})
                rebuilt.append(weights)
        from_loss = []
        for batch in CacheStream(cache, batch_size=8, shuffle=False):
            w, _ = sparse_target_weights(batch["target_logprobs"].double(), batch["target_counts"], batch["target_head"], 1.0)
            for ids, ws in zip(batch["target_ids"].tolist(), w.tolist()):
                from_loss.append({i: x for i, x in zip(ids, ws) if x > 0})
        assert len(rebuilt) == len(from_loss) == m["totals"]["positions"]
        for a, b in zip(rebuilt, from_loss):
            assert a.keys() == b.keys()
            assert all(abs(a[i] - b[i]) < 1e-9 for i in a)


@pytest.fixture(scope="module")
def sampled_student(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled_student") / "student"
    code, _, err = run_cli(["train-student", "--cache", caches["top-k+sample"], "--student", "L2-H128", "--layers", 1,
                            "--hidden", 16, "--heads", 2, "--intermediate", 32, "--max-steps", 1, "--batch-size", 4,
                            "--num-workers", 0, "--no-progress", "--out", out])
    assert code == 0, err
    return out


@pytest.mark.parametrize("damage, message", [
    ("range", "sampled id 600 >= target_vocab_size 400"),
    ("topk-range", "top-k id 600 >= target_vocab_size 400"),
    ("count", "draw counts sum to 33"),
    ("duplicate", "appears twice"),
])
def test_readers_refuse_a_checksum_valid_shard_with_bad_draws(caches, sampled_student, tmp_path, capsys, damage, message):
    """Issue 16, defect 5: what verify catches, training and evaluation catch too, in one line naming
    the shard and the fix (an id >= vocab was a 53-line traceback; bad counts trained silently)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(caches["top-k+sample"], cache)
    assert manifest(cache)["target_vocab_size"] == 400

    def edit(c):
        ids, counts = c["sample_ids"][0], c["sample_counts"][0]
        if damage == "range":
            ids[0] = 600
        elif damage == "topk-range":
            c["topk_ids"][0][0][0] = 600
        elif damage == "count":
            counts[0] += 1
        else:
            ids[1] = ids[0]
    tamper(cache, edit)
    needles = (message, "data/part-00000.parquet", "re-run the same `kdcache dump-logits` command")
    train = ["train-student", "--cache", cache, "--student", "L2-H128", "--layers", 1, "--hidden", 16, "--heads", 2,
             "--intermediate", 32, "--max-steps", 2, "--batch-size", 4, "--no-progress", "--out", tmp_path / "s"]
    for args in ([*train, "--num-workers", 1], [*train, "--num-workers", 0],
                 ["evaluate", "--model", sampled_student, "--cache", cache]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and one_line_error(err) and all(n in err for n in needles), (args, err[-2000:])
    assert not (tmp_path / "s" / "model.safetensors").exists()
