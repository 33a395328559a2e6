"""From tokenized corpus to rows: packing or per-example truncation, MLM static masking, CLM labels.

Rows are defined by the corpus alone (never by batching, timing or ranks), so shard i always holds
the same rows: row r = view r // copies, mask copy r % copies. A view is a packed block of
max_length tokens (the last, partial block kept) or one truncated source example.
Everything for a shard is built on demand from the (memory-mapped) tokenized dataset, so memory
is bounded by the shard, not by the corpus.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..cache.schema import UNKNOWN_LABEL
from ..errors import KdcacheError
from .corpus import LABEL, SOURCE_INDEX, TEXT, TEXT_PAIR

INPUT_IDS, TOKEN_TYPE_IDS, LENGTH, LABEL_ID = "input_ids", "token_type_ids", "length", "label_id"
# Chat corpora (kdcache.dump.chat_spans): the positions whose next token is an assistant token.
TARGET_POSITIONS = "target_positions"
# BERT's recipe: of the selected positions, 80% become [MASK], 10% a random token, 10% stay.
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1


@dataclass
class Row:
    example_id: int
    input_ids: np.ndarray        # int64, exactly what the teacher sees
    positions: np.ndarray        # int64 positions carrying targets
    labels: np.ndarray           # int32, one per position
    token_type_ids: np.ndarray | None = None


def label_converter(label2id: dict | None, num_labels: int):
    """Maps a label cell (int, numeric string or label name) to a class index, or -1 when missing."""
    names = {str(k): int(v) for k, v in (label2id or {}).items()}
    lowered = {k.lower(): v for k, v in names.items()}

    def convert(value) -> int:
        if value is None:
            return UNKNOWN_LABEL
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str):
            key = value.strip()
            if key in names:
                return names[key]
            if key.lower() in lowered:
                return lowered[key.lower()]
            try:
                value = int(key)
            except ValueError:
                raise KdcacheError(f"label {value!r} is not one of the teacher's labels {sorted(names)}; "
                                   "map the --label-column to those names or to 0..num_labels-1") from None
        value = int(value)
        if not 0 <= value < num_labels:
            raise KdcacheError(f"label {value} is outside the teacher's {num_labels} classes; check --label-column")
        return value
    return convert


def tokenize_corpus(corpus, tokenizer, *, task: str, max_length: int, packing: bool, label2id=None, num_labels=0):
    """datasets.map the tokenizer over the corpus (cached by datasets for file-backed corpora)."""
    ds = corpus.dataset
    pair = corpus.has_pair
    convert = label_converter(label2id, num_labels) if corpus.has_label else None
    # Packing cuts blocks itself: sequences longer than the model limit are expected, not an error.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True

    def encode(batch):
        if packing:
            enc = tokenizer(batch[TEXT], add_special_tokens=True, truncation=False,
                            return_attention_mask=False, return_token_type_ids=False)
        else:
            enc = tokenizer(batch[TEXT], batch[TEXT_PAIR] if pair else None, truncation=True, max_length=max_length,
                            return_attention_mask=False, return_token_type_ids=pair)
        out = {INPUT_IDS: enc["input_ids"], LENGTH: [len(ids) for ids in enc["input_ids"]]}
        if pair:
            out[TOKEN_TYPE_IDS] = enc["token_type_ids"]
        if convert is not None:
            out[LABEL_ID] = [convert(v) for v in batch[LABEL]]
        return out

    drop = [c for c in ds.column_names if c not in (SOURCE_INDEX,)]
    return ds.map(encode, batched=True, batch_size=1000, remove_columns=drop, desc="tokenizing")


class MaskingRecipe:
    """BERT static masking, seeded by (seed, example_id): independent of batching, shards and ranks."""

    def __init__(self, tokenizer, vocab_size: int, probability: float, seed: int):
        self.probability, self.seed = probability, seed
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise KdcacheError("the teacher's tokenizer has no mask token, so it cannot be an MLM teacher; check --task")
        special = np.zeros(max(vocab_size, len(tokenizer)), dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i is not None and i < len(special)]] = True
        self.special = special
        self.random_ids = np.flatnonzero(~special[:len(tokenizer)])

    def num_masked(self, num_candidates: int) -> int:
        # As BERT's create_pretraining_data: round(p * n), at least one when there is a candidate.
        return 0 if num_candidates == 0 else max(1, int(math.floor(num_candidates * self.probability + 0.5)))

    def __call__(self, ids: np.ndarray, example_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, example_id])
        candidates = np.flatnonzero(~self.special[ids])
        chosen = np.sort(rng.choice(candidates, self.num_masked(len(candidates)), replace=False))
        u = rng.random(len(chosen))
        masked = ids.copy()
        masked[chosen[u < MASK_FRACTION]] = self.mask_id
        randomized = chosen[(u >= MASK_FRACTION) & (u < MASK_FRACTION + RANDOM_FRACTION)]
        masked[randomized] = self.random_ids[rng.integers(0, len(self.random_ids), len(randomized))]
        return masked, chosen.astype(np.int64), ids[chosen].astype(np.int32)


class RowPlan:
    """The corpus cut into rows and shards. Knows counts up front; builds a shard's rows on demand."""

    def __init__(self, tokenized, *, task: str, max_length: int, packing: bool, shard_rows: int,
                 masking: MaskingRecipe | None = None, mask_copies: int = 1):
        self.ds, self.task, self.max_length, self.packing = tokenized, task, max_length, packing
        self.shard_rows, self.masking = shard_rows, masking
        self.copies = mask_copies if task == "mlm" else 1
        self.lengths = np.asarray(tokenized[LENGTH], dtype=np.int64)
        if packing:
            self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
            self.total_tokens = int(self.cum[-1])
            self.num_views = math.ceil(self.total_tokens / max_length)
        else:
            self.num_views = len(self.lengths)
            self.total_tokens = int(self.lengths.sum())
        self.num_rows = self.num_views * self.copies
        self.num_shards = math.ceil(self.num_rows / shard_rows)

    def row_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_rows))

    def view_length(self, view: int) -> int:
        if self.packing:
            return min(self.max_length, self.total_tokens - view * self.max_length)
        return int(self.lengths[view])

    def shard_tokens(self, shard: int) -> int:
        """Real (unpadded) tokens the teacher sees for this shard."""
        rows_ = self.row_range(shard)
        views = np.arange(rows_.start, rows_.stop) // self.copies
        if self.packing:
            last = self.num_views - 1
            return int(np.where(views == last, self.view_length(last), self.max_length).sum())
        return int(self.lengths[views].sum())

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated corpus, read from the few examples that hold them."""
        first = int(np.searchsorted(self.cum, start, side="right")) - 1
        last = int(np.searchsorted(self.cum, stop, side="left"))
        pieces = self.ds[first:last][INPUT_IDS]
        flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
        offset = start - int(self.cum[first])
        return flat[offset:offset + (stop - start)]

    def rows(self, shard: int) -> list[Row]:
        rows_ = self.row_range(shard)
        if not rows_:
            return []
        v0, v1 = rows_[0] // self.copies, (rows_[-1] // self.copies) + 1
        views = []  # (example id base, ids, next-token labels or None, token types or None, class label, chat target positions or None)
        if self.packing:
            L = self.max_length
            stream = self._stream(v0 * L, min(v1 * L + 1, self.total_tokens))
            for v in range(v0, v1):
                ids = stream[(v - v0) * L:(v - v0 + 1) * L]
                ids = ids[:self.view_length(v)]
                nxt = stream[(v - v0) * L + 1:(v - v0) * L + 1 + len(ids)]
                nxt = np.concatenate([nxt, np.full(len(ids) - len(nxt), -1, dtype=np.int64)])
                views.append((v, ids, nxt, None, None, None))
        else:
            batch = self.ds[v0:v1]
            for j, v in enumerate(range(v0, v1)):
                ids = np.asarray(batch[INPUT_IDS][j], dtype=np.int64)
                nxt = np.concatenate([ids[1:], [-1]])
                tt = np.asarray(batch[TOKEN_TYPE_IDS][j], dtype=np.int64) if TOKEN_TYPE_IDS in batch else None
                label = batch[LABEL_ID][j] if LABEL_ID in batch else UNKNOWN_LABEL
                chosen = np.asarray(batch[TARGET_POSITIONS][j], dtype=np.int64) if TARGET_POSITIONS in batch else None
                views.append((int(batch[SOURCE_INDEX][j]), ids, nxt, tt, label, chosen))
        out = []
        for r in rows_:
            base, ids, nxt, tt, label, chosen = views[r // self.copies - v0]
            example_id = base * self.copies + r % self.copies
            if self.task == "mlm":
                masked, positions, labels = self.masking(ids, example_id)
                out.append(Row(example_id, masked, positions, labels))
            elif self.task == "clm" and chosen is not None:  # a conversation: its assistant targets only
                out.append(Row(example_id, ids, chosen, nxt[chosen].astype(np.int32)))
            elif self.task == "clm":
                out.append(Row(example_id, ids, np.arange(len(ids), dtype=np.int64), nxt.astype(np.int32)))
            else:
                out.append(Row(example_id, ids, np.zeros(1, dtype=np.int64), np.array([label], dtype=np.int32), tt))
        return out
