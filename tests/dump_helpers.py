"""Helpers for the stage-one tests: run the CLI in-process, read a cache, run a teacher directly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def run_cli(args, capsys=None) -> tuple[int, str, str]:
    """Run `kdcache ARGS` in this process; (exit code, stdout, stderr)."""
    from kdcache.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = ("", "")
    if capsys is not None:
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    return code, out, err


def dump(teacher, data, out, *extra, capsys=None, check=True):
    args = ["dump-logits", "--teacher", teacher, "--data", data, "--out", out, "--no-progress", *extra]
    code, stdout, stderr = run_cli(args, capsys)
    if check:
        assert code == 0, f"dump failed ({code}): {stderr}"
    return code, stdout, stderr


def dump_variants(root: Path, teacher, data, kinds: dict, common, variants: dict) -> dict:
    """{(kind, variant): cache}: the same teacher, corpus and seed dumped once per target kind (its args in
    `kinds`) and per variant (its extra args in `variants`), for side-by-side comparisons."""
    out = {}
    for kind, args in kinds.items():
        for variant, extra in variants.items():
            out[kind, variant] = root / f"{kind}-{variant}"
            dump(teacher, data, out[kind, variant], *common, *args, *extra)
    return out


def manifest(cache: Path) -> dict:
    return json.loads((Path(cache) / "manifest.json").read_text())


def read_rows(cache: Path) -> list[dict]:
    """All rows of a cache, sorted by example_id, as plain Python/numpy values."""
    table = pq.read_table(Path(cache) / "data")
    rows = table.to_pylist()
    for r in rows:
        if "topk_ids" in r:  # absent from `sample` caches
            r["topk_ids"] = np.array(r["topk_ids"], dtype=np.int64)
            r["topk_logprobs"] = np.array(r["topk_logprobs"], dtype=np.float32)
    return sorted(rows, key=lambda r: r["example_id"])


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x["example_id"] == y["example_id"]
        assert x.keys() == y.keys()
        # sample_* (sampled kinds) are flat lists per row: compared exactly, as values.
        for key in ("input_ids", "positions", "labels", "sample_lengths", "sample_ids", "sample_logprobs", "sample_counts"):
            assert x.get(key) == y.get(key), (key, x["example_id"])
        if "topk_ids" in x:
            np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
            np.testing.assert_array_equal(x["topk_logprobs"], y["topk_logprobs"])


