"""MLM static masking: BERT's 15% / 80-10-10 recipe, never special tokens, seeded per example id."""
from __future__ import annotations

import numpy as np
import pytest

from dump_helpers import dump, read_rows
from conftest import shakespeare_lines
from kdcache.dump.rows import MaskingRecipe


@pytest.fixture(scope="module")
def sample(wordpiece_tokenizer):
    """~40k tokens of Shakespeare as 64-token packed rows (with [CLS]/[SEP] inside, as packing makes them)."""
    stream = np.array([t for line in shakespeare_lines(3000) for t in wordpiece_tokenizer(line)["input_ids"]])
    return [stream[i:i + 64] for i in range(0, len(stream) - 64, 64)]


def test_recipe_statistics(wordpiece_tokenizer, sample):
    tok = wordpiece_tokenizer
    recipe = MaskingRecipe(tok, len(tok), 0.15, seed=0)
    special = set(tok.all_special_ids)
    candidates = masked = to_mask = kept = randomized = 0
    for example_id, ids in enumerate(sample):
        out, positions, labels = recipe(ids, example_id)
        candidates += sum(t not in special for t in ids)
        masked += len(positions)
        assert not special & set(labels.tolist()), "a special token was selected"
        assert (labels == ids[positions]).all()
        untouched = np.setdiff1d(np.arange(len(ids)), positions)
        assert (out[untouched] == ids[untouched]).all()
        new = out[positions]
        to_mask += int((new == tok.mask_token_id).sum())
        kept += int((new == labels).sum())
        rnd = new[(new != tok.mask_token_id) & (new != labels)]
        randomized += len(rnd)
        assert not special & set(rnd.tolist()), "random replacement drew a special token"
    assert masked > 5000
    assert abs(masked / candidates - 0.15) < 0.005
    assert abs(to_mask / masked - 0.8) < 0.02
    assert abs(kept / masked - 0.1) < 0.015
    assert abs(randomized / masked - 0.1) < 0.015


def test_recipe_is_seeded_by_seed_and_example_id(wordpiece_tokenizer, sample):
    tok = wordpiece_tokenizer
    a, b = MaskingRecipe(tok, len(tok), 0.15, seed=0), MaskingRecipe(tok, len(tok), 0.15, seed=1)
    ids = sample[5]
    first = a(ids, 5)
    for x, y in zip(first, MaskingRecipe(tok, len(tok), 0.15, seed=0)(ids, 5)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[1], a(ids, 6)[1])
    assert not np.array_equal(first[1], b(ids, 5)[1])


def test_masks_do_not_depend_on_shards_or_batches_and_copies_differ(tmp_path, tiny_bert_mlm, shakespeare_txt):
    common = ["--max-length", 32, "--targets", "top-k", "--top-k", 4, "--limit", 120, "--mask-copies", 3]
    dump(tiny_bert_mlm, shakespeare_txt, tmp_path / "a", *common, "--shard-rows", 7, "--batch-size", 3)
    dump(tiny_bert_mlm, shakespeare_txt, tmp_path / "b", *common, "--shard-rows", 50, "--max-tokens-per-batch", 1024)
    a, b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert [r["example_id"] for r in a] == [r["example_id"] for r in b] == list(range(len(a)))
    for x, y in zip(a, b):
        assert (x["input_ids"], x["positions"], x["labels"]) == (y["input_ids"], y["positions"], y["labels"])
        np.testing.assert_allclose(x["topk_logprobs"], y["topk_logprobs"], rtol=2e-3, atol=2e-3)
    # copies of one block: same original tokens, different masks
    for view in range(len(a) // 3):
        copies = a[3 * view:3 * view + 3]
        originals = []
        for r in copies:
            ids = np.array(r["input_ids"])
            ids[r["positions"]] = r["labels"]
            originals.append(ids.tolist())
        assert originals[0] == originals[1] == originals[2]
        assert len({tuple(r["positions"]) for r in copies}) > 1 or len(copies[0]["input_ids"]) < 8
