"""The CUDA-specific part of dump-logits with torch alone: TeacherRunner (pinned memory, non-blocking copies,
one batch in flight, CUDA events) and on-device top-k, against the CPU path; plus GPU timing of
forward + top-k vs a bare forward. For machines that have a GPU and torch but not transformers/datasets.

    python benchmarks/dump_gpu_runner_check.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdcache.dump.batching import make_batches  # noqa: E402
from kdcache.dump.rows import Row  # noqa: E402
from kdcache.dump.run import TeacherRunner  # noqa: E402


class Encoder(nn.Module):
    """BERT-base-shaped masked LM stand-in: embeddings, 12 x 768 encoder, 30,522-way head."""

    def __init__(self, vocab=30522, d=768, layers=12, heads=12, max_len=512):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=False, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask, **_):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return SimpleNamespace(logits=self.head(x))


def make_rows(n, rng, vocab=30522):
    rows = []
    for i in range(n):
        length = int(rng.integers(16, 129))
        ids = rng.integers(5, vocab, length)
        positions = np.sort(rng.choice(length, max(1, round(0.15 * length)), replace=False))
        rows.append(Row(i, ids, positions.astype(np.int64), ids[positions].astype(np.int32)))
    return rows


def run(runner, batches):
    out, pending = [], None
    for batch in batches + [None]:
        launched = runner.launch(batch) if batch is not None else None
        if pending is not None:
            got, bad = runner.finish(pending)
            out.extend(got)
            assert not bad, bad
        pending = launched
    return out


def main():
    assert torch.cuda.is_available(), "needs CUDA"
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cpu_model = Encoder().eval()
    rows = make_rows(512, rng)
    lengths = [len(r.input_ids) for r in rows]
    batches = [[rows[i] for i in b] for b in make_batches(lengths, max_tokens=16384)]
    teacher = lambda m: SimpleNamespace(model=m)  # noqa: E731
    k = 64
    ref = run(TeacherRunner(teacher(cpu_model), "mlm", k, torch.device("cpu"), 0), batches[:4])
    n_ref = sum(len(b) for b in batches[:4])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gpu_model = Encoder().eval()
        gpu_model.load_state_dict(cpu_model.state_dict())
        gpu_model = gpu_model.to("cuda", dtype=dtype)
        runner = TeacherRunner(teacher(gpu_model), "mlm", k, torch.device("cuda"), 0)
        got = run(runner, batches[:4])
        assert [r.example_id for r, _, _ in got] == [r.example_id for r, _, _ in ref]
        lp_ref = np.concatenate([v for _, _, v in ref]).astype(np.float32)
        lp_got = np.concatenate([v for _, _, v in got]).astype(np.float32)
        top1 = np.mean(np.concatenate([i[:, 0] for _, i, _ in ref]) == np.concatenate([i[:, 0] for _, i, _ in got]))
        err = np.abs(lp_ref - lp_got)
        ok_sorted = all((np.diff(v.astype(np.float32), axis=1) <= 0).all() for _, _, v in got)
        print(f"{str(dtype):>14}: {n_ref} rows, {len(lp_ref)} positions vs CPU fp32: |sorted top-{k} log-prob diff| max {err.max():.4f} "
              f"mean {err.mean():.5f}; top-1 id agreement {top1:.4f}; sorted {ok_sorted}")
        if dtype == torch.float32:
            assert err.max() < 1e-2, "CUDA fp32 disagrees with CPU"

        # timing: bare forward vs forward + on-device top-k + host copies, same batches, alternating
        sync = torch.cuda.synchronize
        def bare():
            sync(); t = time.perf_counter()
            for b in batches:
                runner.forward(runner.collate(b))
            sync(); return time.perf_counter() - t
        def full():
            sync(); t = time.perf_counter()
            run(runner, batches)
            sync(); return time.perf_counter() - t
        bare(), full()
        ratios = []
        for _ in range(5):
            b1, f, b2 = bare(), full(), bare()
            ratios.append(f / ((b1 + b2) / 2))
        tokens = sum(lengths)
        print(f"{str(dtype):>14}: {tokens:,} tokens in {len(batches)} batches; forward+top-k / bare forward median "
              f"{statistics.median(ratios):.3f} (reps {', '.join(f'{r:.3f}' for r in ratios)}); bare {tokens / b1:,.0f} tokens/s")

    # NaN/inf detection on the device names the rows
    poisoned = Encoder().eval()
    poisoned.load_state_dict(cpu_model.state_dict())
    with torch.no_grad():
        poisoned.tok.weight[7] = float("inf")
    rows[3].input_ids[5] = 7
    runner = TeacherRunner(teacher(poisoned.to("cuda", torch.float16)), "mlm", k, torch.device("cuda"), 0)
    _, bad = runner(rows[:8])
    expected = [r.example_id for r in rows[:8] if 7 in r.input_ids]
    print(f"poisoned token 7 (in rows {expected}) -> non-finite rows reported: {bad}")
    assert bad == expected and 3 in bad, bad


if __name__ == "__main__":
    main()
