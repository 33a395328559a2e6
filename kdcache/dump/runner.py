"""The forward loop: batches of a shard through the teacher, one batch in flight, to host-side targets."""
from __future__ import annotations

import numpy as np
import torch

from ..cache import schema as S
from ..cache.kinds import kind_of
from ..cache.kinds.sample import pack_draws
from ..errors import KdcacheError
from .targets import sampled_targets, select_targets, target_entropies, topk_targets


class TeacherRunner:
    """Pads a batch on the right, runs the teacher, returns host-side soft targets per row.

    Right padding keeps default position ids correct for every architecture.
    kind/samples/seed: the target kind (top-k, sample, top-k+sample), draws per position and the
    seed the draws are keyed by (with each target's example id and position). draw_logprobs=False:
    the draws' log-probs are not copied to the host (the cache stores counts only; the draws are the same).
    select_positions: soft targets only at this fraction of each row's targets, the highest-entropy ones
    (format v3; None: at every target). The kind's targets are computed for those targets only.
    """

    def __init__(self, teacher, task: str, k: int, device: torch.device, pad_id: int, *,
                 kind: str = S.TOP_K, samples: int = 0, seed: int = 0, draw_logprobs: bool = True,
                 select_positions: float | None = None):
        self.model, self.task, self.k, self.device, self.pad_id = teacher.model, task, k, device, pad_id
        self.kind, self.samples, self.seed = kind, samples, seed
        self.draw_logprobs = draw_logprobs
        self.select = select_positions
        self.pin = device.type == "cuda"

    def collate(self, rows) -> dict:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long) if rows[0].token_type_ids is not None else None
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.from_numpy(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
            if tt is not None:
                tt[i, :len(r.input_ids)] = torch.from_numpy(r.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if tt is not None:
            batch["token_type_ids"] = tt
        if self.pin:
            batch = {key: v.pin_memory() for key, v in batch.items()}
        return {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}

    def forward(self, batch: dict) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.task == "clm" else {}
        with torch.inference_mode():
            return self.model(**batch, **kwargs).logits

    def device_targets(self, logits, b, p, e) -> tuple:
        """(top-k ids, top-k log-probs, finite flags, [sampled ids, log-probs, counts] or None) for the
        targets at rows b, positions p (example ids e), computed on the teacher's device."""
        kind = kind_of(self.kind)  # which of the two device computations the kind stores
        if not kind.draws:
            return (*topk_targets(logits, b, p, self.k), None)
        drawn = sampled_targets(logits, b, p, e, seed=self.seed, samples=self.samples,
                                head=self.k if kind.head else 0)
        # Counts fit 16 bits for any N the CLI allows below 2^15: half the bytes to copy to the host.
        counts = drawn["counts"].to(torch.int16) if self.samples < 2**15 else drawn["counts"]
        logprobs = drawn["logprobs"] if self.draw_logprobs else None
        return drawn["head_ids"], drawn["head_logprobs"], drawn["finite"], [drawn["ids"], logprobs, counts]

    def launch(self, rows) -> tuple:
        """Queue the forward and top-k of one batch; on CUDA this returns before the GPU is done,
        so the host can prepare the next batch meanwhile (finish() waits)."""
        batch = self.collate(rows)
        logits = self.forward(batch)
        with torch.inference_mode():
            if self.task == "seq-cls":
                ids, values, finite = topk_targets(logits, None, None, self.k)  # every class, exactly
                sampled = None
                counts = [1] * len(rows)
                mask = None
            else:
                counts = [len(r.positions) for r in rows]
                b = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts))
                p = torch.from_numpy(np.concatenate([r.positions for r in rows]))
                e = torch.repeat_interleave(torch.tensor([r.example_id for r in rows], dtype=torch.long), torch.tensor(counts))
                if self.pin:
                    b, p, e = b.pin_memory(), p.pin_memory(), e.pin_memory()
                b, p, e = (t.to(self.device, non_blocking=True) for t in (b, p, e))
                if self.select is None:
                    ids, values, finite, sampled = self.device_targets(logits, b, p, e)
                    mask = None
                else:
                    ids, values, finite, sampled, mask = self.selected_targets(logits, b, p, e, counts)
            del logits  # the full-vocabulary logits stay on the device and are freed here
            host = [t.to("cpu", non_blocking=self.pin) if t is not None else None for t in (ids, values, finite)]
            if sampled is not None:
                host.append([t.to("cpu", non_blocking=self.pin) if t is not None else None for t in sampled])
            host_mask = mask.to("cpu", non_blocking=self.pin) if mask is not None else None
        event = None
        if self.pin:
            event = torch.cuda.Event()
            event.record()
        return rows, counts, host, event, host_mask

    def selected_targets(self, logits, b, p, e, counts: list[int]) -> tuple:
        """device_targets at the selected targets only, plus the finite flags of every target and the
        (M,) mask of the selected ones: per row the ceil(fraction × targets) of highest teacher entropy."""
        keep = S.selected_counts(self.select, counts)
        starts = np.cumsum(counts) - np.asarray(counts, dtype=np.int64)
        # Each row's first `keep` slots of the row-grouped, entropy-sorted order (select_targets).
        keep_at = np.repeat(starts, keep) + (np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep))
        keep_at = torch.from_numpy(keep_at.astype(np.int64))
        if self.pin:
            keep_at = keep_at.pin_memory()
        entropy = target_entropies(logits, b, p)
        chosen = select_targets(entropy, b, keep_at.to(self.device, non_blocking=True))
        mask = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device).index_fill_(0, chosen, True)
        ids, values, _, sampled = self.device_targets(logits, b[chosen], p[chosen], e[chosen])
        # Finite at every target (entropy is NaN wherever a logit is NaN or +inf), not only the selected.
        return ids, values, torch.isfinite(entropy), sampled, mask

    @staticmethod
    def finish(pending) -> tuple[list, list[int]]:
        """[(row, topk_ids, topk_logprobs[, samples][, soft_mask])] and the example ids whose outputs
        were not finite.

        samples (sampled kinds): (entries per position, ids, log-probs, counts), flat over the row's
        positions in order; topk_ids/topk_logprobs are None for the `sample` kind.
        soft_mask (selected caches only; samples is then None for top-k): the row's (n,) bools, True at the
        selected targets; the soft parts before it cover those targets only, in position order."""
        rows, counts, host, event, host_mask = pending
        if event is not None:
            event.synchronize()
        ids, values, finite = (t.numpy() if t is not None else None for t in host[:3])
        mask = host_mask.numpy() if host_mask is not None else None
        sampled = len(host) > 3
        if sampled:
            lengths, flat = pack_draws(*(t.numpy() if t is not None else None for t in host[3]))
            entry_offsets = np.concatenate([[0], np.cumsum(lengths)])
        out, bad, start, soft = [], [], 0, 0  # soft: where the row's soft parts start (= start unless selected)
        for r, n in zip(rows, counts):
            stop = start + n
            soft_stop = soft + (int(mask[start:stop].sum()) if mask is not None else n)
            result = (r, None if ids is None else ids[soft:soft_stop], None if values is None else values[soft:soft_stop])
            if sampled:
                a, b = entry_offsets[soft], entry_offsets[soft_stop]
                result += ((lengths[soft:soft_stop],) + tuple(f[a:b] if f is not None else None for f in flat),)
            if mask is not None:
                result += ((None,) if not sampled else ()) + (mask[start:stop],)
            out.append(result)
            if not finite[start:stop].all():
                bad.append(r.example_id)
            start, soft = stop, soft_stop
        return out, bad

    def __call__(self, rows) -> tuple[list, list[int]]:
        return self.finish(self.launch(rows))


def forward_shard(runner: TeacherRunner, rows: list, batches: list, *, shard: int, dtype: str, on_tokens=None) -> list:
    """Every row of one shard through the teacher: [(row, ids, log-probs[, samples])].

    One batch in flight: batch t+1 is launched before t is collected (overlaps host work with the
    GPU). on_tokens(n) is told the real tokens of each finished batch."""
    results = []
    pending = None
    for batch in batches + [None]:
        launched = runner.launch([rows[i] for i in batch]) if batch is not None else None
        if pending is not None:
            got, bad = runner.finish(pending)
            if bad:
                raise KdcacheError(
                    f"the teacher produced NaN/inf logits for example ids {', '.join(map(str, bad[:10]))}"
                    f"{' ...' if len(bad) > 10 else ''} (shard {shard}, dtype {dtype}); "
                    "fp16 overflows are common: re-run with --dtype bf16 or --dtype fp32 (completed shards are kept)")
            results.extend(got)
            if on_tokens is not None:
                on_tokens(sum(len(r.input_ids) for r in pending[0]))
        pending = launched
    return results
