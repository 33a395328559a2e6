"""Peak RSS of dump-logits at 1x and 10x corpus: memory is bounded by the shard, not the corpus.

Each dump runs in a fresh subprocess (so nothing is shared or cached in memory); peak RSS is the
child's ru_maxrss. Teacher: a tiny randomly initialised BERT MLM (memory, not speed, is measured).

    python benchmarks/dump_memory.py [--copies 10] [--base-lines 4000] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from kdcache.dump.run import DumpOptions, run_dump
t = time.perf_counter()
r = run_dump(DumpOptions(teacher=sys.argv[1], data=sys.argv[2], out=sys.argv[3], max_length=128, targets="top-k", top_k=16,
                         shard_rows=256, max_tokens_per_batch=4096, device="cpu", progress=False, echo=lambda *a, **k: None))
print(json.dumps({"rows": r.rows, "tokens": r.real_tokens, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--base-lines", type=int, default=4000, help="1x corpus = the first N lines of Tiny Shakespeare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kdcache-bench"))
    args = ap.parse_args()
    from dump_common import SHAKESPEARE, bert_mlm_teacher

    work = Path(args.work)
    teacher_dir = bert_mlm_teacher(work / "bert-tiny-random", size="tiny")
    lines = SHAKESPEARE.read_text().splitlines()
    if args.base_lines * args.copies > len(lines):
        sys.exit(f"Tiny Shakespeare has {len(lines)} lines; lower --base-lines or --copies")
    results = {}
    for copies in (1, args.copies):
        corpus = work / f"shakespeare_x{copies}.txt"
        corpus.write_text("\n".join(lines[:args.base_lines * copies]) + "\n")  # real text, not repeats
        out = work / f"memory_cache_x{copies}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(teacher_dir), str(corpus), str(out), str(args.threads)],
                              capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results[copies] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[copies]
        print(f"{copies:>2}x corpus: {r['rows']:,} rows, {r['tokens']:,} tokens, {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    a, b = results[1], results[args.copies]
    print(f"peak RSS ratio {args.copies}x / 1x corpus: {b['peak_rss_mib'] / a['peak_rss_mib']:.3f} "
          f"(corpus ratio {b['tokens'] / a['tokens']:.1f})")


if __name__ == "__main__":
    main()
