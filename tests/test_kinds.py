"""Target kinds have one home each (kdcache/cache/kinds/): a kind registered in one place is written,
verified, checked on read, streamed into batches, weighted and inspected with nothing else changed,
and every built-in kind's columns round-trip from the dump's host arrays to per-id loss weights that
match an independent computation."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kdcache.cache.collate import DecodedRows, collate
from kdcache.cache.kinds import KINDS, TargetKind, kind_for_columns, kind_of, register, unregister
from kdcache.cache.kinds.base import flat, list_array, ragged
from kdcache.cache.manifest import view
from kdcache.cache.schema import TARGET_KINDS, arrow_schema
from kdcache.cache.stats import cache_stats
from kdcache.cache.stream import CacheStream
from kdcache.cache.verify import check_rows, verify_cache
from kdcache.dump.rows import Row
from kdcache.dump.writer import build_table
from kdcache.errors import KdcacheError

from stage2_helpers import write_cache

ARGMAX_IDS = "argmax_ids"
VOCAB = 50


class Argmax(TargetKind):
    """A toy kind, defined here only: the teacher's most probable id per position, nothing else."""
    name = "argmax"
    head, draws = False, False  # neither the manifest's k-wide head nor draws
    columns = per_position = (ARGMAX_IDS,)

    def describe(self, k, samples):
        return "argmax"

    def raw_bytes(self, k, samples, id_bytes, target_vocab_size):
        return id_bytes

    def fields(self, *, k, samples, target):
        return [pa.field(ARGMAX_IDS, pa.list_(target), nullable=False)]

    def encode(self, results, n_pos, field, k):
        ids = np.concatenate([r[1][:, 0] for r in results]).astype(np.int64)
        return {ARGMAX_IDS: list_array(n_pos, ids, field(ARGMAX_IDS).type)}

    def read_check(self, table, manifest, n_pos=None):
        if ARGMAX_IDS not in table.column_names:
            return None
        ids = flat(table.column(ARGMAX_IDS), 1)
        if ids.size and int(ids.max()) >= manifest.target_vocab_size:
            return f"argmax id {int(ids.max())} >= target_vocab_size {manifest.target_vocab_size}"
        return None

    def verify(self, table, manifest, n_pos):
        return self.read_check(table, manifest)

    def decode(self, table, target_offsets):
        ids = ragged(table.column(ARGMAX_IDS))[0]

        class Decoded:
            def take(self, targets):
                return {"argmax": ids[targets].astype(np.int32)}
        return Decoded()

    def batch(self, parts):
        import torch
        ids = torch.from_numpy(parts["argmax"][:, None])
        return {"target_ids": ids, "target_logprobs": torch.zeros(ids.shape, dtype=torch.float16)}

    def weights(self, logprobs, counts, head, temperature):
        import torch
        return torch.ones_like(logprobs, dtype=torch.float32), torch.zeros_like(logprobs, dtype=torch.float32)

    def stats(self, table, k, totals):
        ids = flat(table.column(ARGMAX_IDS), 1).astype(np.int64)
        totals["entries"] += len(ids)
        return ids


@pytest.fixture
def argmax_kind():
    kind = register(Argmax())
    yield kind
    unregister(kind.name)


def _argmax_rows(rng, n: int, bad: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        length = int(rng.integers(3, 10))
        positions = list(range(1, length))
        ids = rng.integers(0, VOCAB, len(positions))
        if bad and i == n - 1:
            ids[0] = VOCAB  # one past the vocabulary: fits the uint8 column, breaks the loss
        rows.append({"example_id": 100 + i, "input_ids": rng.integers(1, VOCAB, length).tolist(),
                     "positions": positions, ARGMAX_IDS: ids.tolist(),
                     "labels": [int(x) if rng.random() < 0.5 else int(rng.integers(0, VOCAB)) for x in ids]})
    return rows


def test_a_kind_registered_in_one_place_goes_through_every_stage(tmp_path, argmax_kind):
    rows = _argmax_rows(np.random.default_rng(0), 40)
    cache = write_cache(tmp_path / "c", rows, task="clm", k=0, vocab_size=VOCAB, max_length=16, shard_rows=16,
                        row_group_rows=8, kind="argmax")
    # schema: the kind's field sits between positions and labels
    schema = arrow_schema(k=0, vocab_size=VOCAB, max_length=16, kind="argmax")
    assert schema.names == ["example_id", "input_ids", "positions", ARGMAX_IDS, "labels"]
    assert verify_cache(cache)["rows"] == 40
    # stream + collate: every target's id comes back where it was written
    got = {}
    for batch in CacheStream(cache, batch_size=6, shuffle=False):
        eids = batch["example_id"][batch["target_rows"]].tolist()
        for e, p, t in zip(eids, batch["target_positions"].tolist(), batch["target_ids"][:, 0].tolist()):
            got[(e, p)] = t
    want = {(r["example_id"], p): t for r in rows for p, t in zip(r["positions"], r[ARGMAX_IDS])}
    assert got == want
    # inspect: the kind's top-1 against the labels, counted independently
    labels = np.concatenate([r["labels"] for r in rows])
    top1 = np.concatenate([r[ARGMAX_IDS] for r in rows])
    stats = cache_stats(cache)
    assert stats["targets"] == "argmax" and stats["mean_topk_mass"] is None
    assert stats["teacher_top1_accuracy"] == round(float((labels == top1).mean()), 6)
    assert stats["mean_ids_per_position"] == 1.0
    # dump side: the writer encodes the kind's column from the runner's host arrays
    results = [(Row(r["example_id"], np.array(r["input_ids"]), np.array(r["positions"]), np.array(r["labels"], np.int32)),
                np.array(r[ARGMAX_IDS])[:, None], np.zeros((len(r["positions"]), 1), np.float16)) for r in rows[:5]]
    table = build_table(results, schema, 1)
    assert table.column(ARGMAX_IDS).to_pylist() == [r[ARGMAX_IDS] for r in rows[:5]]


def test_a_registered_kinds_own_checks_run_in_verify_and_on_read(tmp_path, argmax_kind):
    rows = _argmax_rows(np.random.default_rng(1), 20, bad=True)
    cache = write_cache(tmp_path / "c", rows, task="clm", k=0, vocab_size=VOCAB, max_length=16, kind="argmax")
    with pytest.raises(KdcacheError, match=f"argmax id {VOCAB} >= target_vocab_size {VOCAB}"):
        verify_cache(cache)
    with pytest.raises(KdcacheError, match=f"argmax id {VOCAB} >= target_vocab_size {VOCAB}"):
        list(CacheStream(cache, batch_size=4, shuffle=False))


def test_an_unknown_kind_is_a_one_line_error(tmp_path):
    rows = _argmax_rows(np.random.default_rng(2), 4)
    with pytest.raises(KdcacheError, match="target kind 'argmax' is not one this kdcache knows"):
        write_cache(tmp_path / "c", rows, task="clm", k=0, vocab_size=VOCAB, max_length=16, kind="argmax")


def test_dump_cli_offers_the_registry_kinds():
    from kdcache.dump.command import dump_logits
    choice = next(p for p in dump_logits.params if p.name == "targets").type
    assert tuple(choice.choices) == TARGET_KINDS == tuple(k for k in KINDS if k != "argmax")


# ------------------------------------------------------------------ built-in kinds round-trip

K, N = 3, 8


def _host_results(kind: TargetKind, rng) -> list:
    """What TeacherRunner.finish hands the writer for a few rows, from a random teacher."""
    results = []
    for i in range(5):
        n = int(rng.integers(1, 6))
        length = n + 2
        row = Row(10 + i, rng.integers(1, VOCAB, length), np.arange(1, n + 1), rng.integers(-1, VOCAB, n).astype(np.int32))
        probs = rng.dirichlet(np.full(VOCAB, 0.3), n)
        order = np.argsort(-probs, axis=1, kind="stable")
        lp = np.log(probs)
        head_ids = order[:, :K] if kind.head else None
        head_lp = np.take_along_axis(lp, order[:, :K], 1).astype(np.float16) if kind.head else None
        result = (row, head_ids, head_lp)
        if kind.draws:
            lengths, ids, lps, counts = [], [], [], []
            for j in range(n):
                tail = probs[j].copy()
                if kind.head:
                    tail[order[j, :K]] = 0
                hits = rng.multinomial(N, tail / tail.sum())
                drawn = np.flatnonzero(hits)
                drawn = drawn[np.argsort(-lp[j, drawn], kind="stable")]  # most probable first
                lengths.append(len(drawn))
                ids += drawn.tolist()
                lps += lp[j, drawn].tolist()
                counts += hits[drawn].tolist()
            result += ((np.array(lengths), np.array(ids), np.array(lps, np.float16), np.array(counts)),)
        results.append(result)
    return results


def _expected_weights(kind: TargetKind, result) -> list[dict]:
    """Per position {id: weight} at T = 1, straight from the definitions in docs/FORMAT.md."""
    row, head_ids, head_lp = result[:3]
    out = []
    start = 0
    for j in range(len(row.positions)):
        w = {}
        head_mass = 0.0
        if kind.head:
            p = np.exp(head_lp[j].astype(np.float64))
            head_mass = p.sum()
            if not kind.draws:
                p = p / p.sum()  # top-k renormalised
            w.update(zip(head_ids[j].tolist(), p.tolist()))
        if kind.draws:
            lengths, ids, _, counts = result[3]
            stop = start + int(lengths[j])
            for i, c in zip(ids[start:stop].tolist(), counts[start:stop].tolist()):
                w[i] = (1 - head_mass) * c / N
            start = stop
        out.append(w)
    return out


@pytest.mark.parametrize("name", ["top-k", "sample", "top-k+sample"])
def test_every_builtin_kind_round_trips_from_host_arrays_to_loss_weights(name):
    kind = kind_of(name)
    rng = np.random.default_rng(3)
    results = _host_results(kind, rng)
    manifest = view({"task": "clm", "vocab_size": VOCAB, "max_length": 16, "format_version": 2,
                     "targets": {"kind": name, "k": K if kind.head else 0, "samples": N if kind.draws else 0}})
    schema = arrow_schema(k=manifest.k, vocab_size=VOCAB, max_length=16, kind=name, samples=manifest.samples)
    table = build_table(results, schema, manifest.k)
    assert [c for c in table.column_names if c in kind.columns] == list(kind.columns)
    n_pos = np.array([len(r[0].positions) for r in results])
    assert kind.verify(table, manifest, n_pos) is None
    assert check_rows(table, manifest) is None
    decoded = DecodedRows(table)
    assert kind_for_columns(table.column_names) is kind and decoded.kind is kind
    batch = collate([(decoded, np.arange(table.num_rows))])
    w, _ = kind.weights(batch["target_logprobs"], batch.get("target_counts"), batch.get("target_head", 0), 1.0)
    ids = batch["target_ids"].numpy()
    got = [{i: x for i, x in zip(ids[t].tolist(), w[t].tolist()) if x > 0} for t in range(len(ids))]
    want = [w for r in results for w in _expected_weights(kind, r)]
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert g.keys() == e.keys()
        assert np.allclose([g[i] for i in e], [e[i] for i in e], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("wide", [False, True])
def test_repeated_sampled_ids_are_found_as_a_per_position_scan_finds_them(wide):
    from kdcache.cache.kinds.sample import _repeats_an_id
    rng = np.random.default_rng(4)
    for trial in range(200):
        entries = rng.integers(0, 6, int(rng.integers(0, 40)))
        if wide and len(entries):  # one very wide position: the padded layout would be mostly padding
            entries[0] = 5000
        ids = np.concatenate([rng.choice(VOCAB * 200, e, replace=False) for e in entries]).astype(np.uint16) \
            if len(entries) else np.zeros(0, np.uint16)
        if trial % 2 and ids.size > 1:  # plant a repeat inside one position
            starts = np.cumsum(entries) - entries
            j = int(rng.choice(np.flatnonzero(entries >= 2))) if (entries >= 2).any() else None
            if j is not None:
                ids[starts[j] + entries[j] - 1] = ids[starts[j]]
        spans = np.split(ids, np.cumsum(entries)[:-1]) if len(entries) else []
        want = any(len(set(s.tolist())) < len(s) for s in spans)
        assert _repeats_an_id(entries.astype(np.int64), ids, VOCAB * 200) == want


@pytest.mark.parametrize("wide", [False, True])
def test_read_time_repeat_check_against_brute_force(wide):
    """The one-sort check of distinct draws and draws outside the head (both layouts it picks between)
    against a per-position Python set, on random rows with and without planted repeats."""
    from kdcache.cache.kinds.sample import _repeats_an_id
    rng = np.random.default_rng(3)
    size, k = 50, 3
    for trial in range(60):
        positions = 400 if wide else 40
        entries = rng.integers(0, 6, positions)
        if wide:  # one very wide position among many: the sorted-keys layout
            entries[0] = 45
            assert 45 * positions > 4 * entries.sum() + 4096
        head = np.stack([rng.choice(size, k, replace=False) for _ in range(positions)])
        ids = np.concatenate([rng.choice(np.setdiff1d(np.arange(size), h), n, replace=False)
                              for h, n in zip(head, entries)]).astype(np.int64)
        plant = trial % 3  # 0: clean, 1: a draw repeated, 2: a draw equal to a head id
        j = int(np.flatnonzero(entries >= 2)[trial % len(np.flatnonzero(entries >= 2))])
        start = int(entries[:j].sum())
        if plant == 1:
            ids[start + 1] = ids[start]
        elif plant == 2:
            ids[start] = head[j, trial % k]
        pieces = np.split(ids, np.cumsum(entries)[:-1])
        draws_repeat = any(len(set(p.tolist())) < len(p) for p in pieces)
        any_repeat = draws_repeat or any(set(p.tolist()) & set(h.tolist()) for p, h in zip(pieces, head))
        assert _repeats_an_id(entries, ids, size) == draws_repeat
        assert _repeats_an_id(entries, ids, size, head) == any_repeat
        assert any_repeat == (plant != 0)
