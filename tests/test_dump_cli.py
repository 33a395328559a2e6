"""dump-logits as a user meets it: dry run, summary, re-runs, --overwrite, --help."""
from __future__ import annotations

from dump_helpers import assert_same_rows, dump, manifest, read_rows, run_cli

ARGS = ["--max-length", 32, "--targets", "top-k", "--top-k", 8, "--shard-rows", 30, "--limit", 150, "--mask-copies", 2]


def test_dry_run_counts_match_the_real_dump_and_write_nothing(tmp_path, tiny_bert_mlm, shakespeare_txt, capsys):
    out = tmp_path / "cache"
    _, dry, _ = dump(tiny_bert_mlm, shakespeare_txt, out, *ARGS, "--dry-run", capsys=capsys)
    assert not out.exists()
    _, real, _ = dump(tiny_bert_mlm, shakespeare_txt, out, *ARGS, capsys=capsys)
    m = manifest(out)
    assert f"{m['totals']['rows']:,} rows, {m['totals']['positions']:,} target positions" in dry
    assert "estimated cache size" in dry and "teacher was not run" in dry
    # the end-of-run summary paragraph
    assert f"Wrote {m['totals']['rows']:,} rows with {m['totals']['positions']:,} target positions" in real
    assert "bytes per position" in real and "tokens/s" in real and "cache complete" in real


def test_rerun_resumes_and_overwrite_replaces(tmp_path, tiny_bert_mlm, shakespeare_txt, capsys):
    out = tmp_path / "cache"
    dump(tiny_bert_mlm, shakespeare_txt, out, *ARGS, capsys=capsys)
    first = read_rows(out)
    first_run = manifest(out)["dump"]
    assert first_run["real_tokens"] > 0 and first_run["seconds"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    # identical re-run: nothing to do, nothing rewritten, and the record of the real run is kept
    _, text, _ = dump(tiny_bert_mlm, shakespeare_txt, out, *ARGS, capsys=capsys)
    assert "this run processed 0 tokens" in text
    assert {p: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")} == mtimes
    assert manifest(out)["dump"] == first_run
    # a missing shard is redone, the rest kept; the record adds this session to the earlier one
    (out / "data" / "_part-00002.stats.json").unlink()
    _, text, _ = dump(tiny_bert_mlm, shakespeare_txt, out, *ARGS, capsys=capsys)
    assert "resuming" in text and manifest(out)["complete"]
    assert_same_rows(read_rows(out), first)
    both = manifest(out)["dump"]
    assert both["sessions"] == 2 and both["seconds"] > first_run["seconds"]
    assert first_run["real_tokens"] < both["real_tokens"] < 2 * first_run["real_tokens"]
    # --overwrite with another k replaces the cache
    args = [a if a != 8 else 4 for a in ARGS]
    dump(tiny_bert_mlm, shakespeare_txt, out, *args, "--overwrite", capsys=capsys)
    assert manifest(out)["k"] == 4 and manifest(out)["complete"]
    assert read_rows(out)[0]["topk_ids"].shape[1] == 4


def test_help_lists_every_option(capsys):
    code, text, _ = run_cli(["dump-logits", "--help"], capsys)
    assert code == 0
    for option in ("--teacher", "--data", "--out", "--task", "--split", "--text-column", "--text-pair-column",
                   "--label-column", "--max-length", "--packing", "--mlm-probability", "--mask-copies", "--top-k",
                   "--dtype", "--device", "--batch-size", "--max-tokens-per-batch", "--shard-rows", "--seed",
                   "--limit", "--overwrite", "--dry-run"):
        assert option in text, option


def test_batches_are_length_sorted_capped_and_cover_every_row():
    import random

    from kdcache.dump.batching import make_batches, padded_tokens

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(2000)]
    for batch_size, max_tokens in ((32, None), (None, 1024), (64, 2048)):
        batches = make_batches(lengths, batch_size=batch_size, max_tokens=max_tokens)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)
        for b in batches:
            width = max(lengths[i] for i in b)
            assert len(b) == 1 or ((not batch_size or len(b) <= batch_size)
                                   and (not max_tokens or len(b) * width <= max_tokens))
            assert len(b) * width <= 1.05 * sum(lengths[i] for i in b) or len(b) == 1
        assert padded_tokens(lengths, batches) <= 1.05 * sum(lengths)
    # the order inside a shard is a pure function of the lengths (ties by row order)
    assert make_batches(lengths, max_tokens=1024) == make_batches(list(lengths), max_tokens=1024)


def test_on_device_targets_equal_fp32_log_softmax_and_flag_only_nan_or_plus_inf():
    import torch

    from kdcache.dump.targets import topk_targets

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 300).half() * 8
    logits[0, 1, 3] = float("inf")
    logits[1, 2, 4] = float("nan")
    logits[1, 3, :10] = float("-inf")  # vocabulary masking: legitimate
    b, p = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 5])
    ids, values, finite = topk_targets(logits, b, p, 16)
    assert finite.tolist() == [True, False, False, True, True]
    assert ids.dtype == torch.int32 and values.dtype == torch.float16
    ref = torch.log_softmax(logits[b, p].float(), dim=-1).topk(16)
    ok = finite.nonzero().flatten()
    assert torch.equal(ids[ok].long(), ref.indices[ok])
    assert torch.allclose(values[ok].float(), ref.values[ok], rtol=1e-3, atol=1e-3)
