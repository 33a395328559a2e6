"""--resume is bound to the cache's content, not its path (issue 16, defect 1): a cache re-dumped
under the same path is refused in one line; the same cache copied elsewhere resumes."""
from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file

from test_trust import DUMP, copy_cache, one_line_error, setup, train_args  # noqa: F401 - setup is a fixture
from stage2_helpers import cli_ok


def test_resume_follows_the_caches_content_not_its_path(setup, tmp_path):
    cache = copy_cache(setup, tmp_path)
    out = tmp_path / "student"
    cli_ok(train_args(cache, out, "--max-steps", 3, "--stop-after-steps", 1))
    assert (out / "checkpoint").is_dir()
    moved_out = tmp_path / "student-moved"
    shutil.copytree(out, moved_out)
    whole = tmp_path / "uninterrupted"
    cli_ok(train_args(cache, whole, "--max-steps", 3))

    # The very same cache at another path: resumes, and ends where an uninterrupted run does.
    moved = tmp_path / "elsewhere" / "cache"
    shutil.copytree(cache, moved)
    cli_ok(train_args(moved, moved_out, "--max-steps", 3, "--resume"))
    summary = json.loads((moved_out / "train_summary.json").read_text())
    assert summary["done"] and summary["steps"] == 3 and summary["cache"] == str(moved)
    a, b = load_file(moved_out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # Another cache under the same path (re-dumped with another --top-k): refused, the checkpoint kept.
    cli_ok(["dump-logits", "--teacher", setup["teacher"], "--data", setup["corpus"], "--out", cache,
            *[a for a in DUMP if a != 4 and a != "--top-k"], "--targets", "top-k", "--top-k", 2, "--overwrite"])
    checkpoint = (out / "checkpoint" / "model.safetensors").read_bytes()
    one_line_error(train_args(cache, out, "--max-steps", 3, "--resume"), f"cannot resume {out}",
                   "does not hold the cache its checkpoint was trained on", "re-dumped")
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == checkpoint
    assert not (out / "model.safetensors").exists()
