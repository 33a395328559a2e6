"""Loader from a bucket vs from local disk, side by side in one run: target positions per second
that the training loader delivers (DataLoader with N workers, as train-student runs it) from the
same cache on local disk and in an S3 bucket.

The bucket is moto's S3 server on 127.0.0.1 (a single Python process) behind a proxy that adds
--latency-ms to each request, a stand-in for the round trip to a real bucket; the figure measures
what reading through pyarrow's S3 filesystem costs kdcache's loader (ranged GETs per row group,
footers per opened shard), not S3's own throughput. Also the bucket without read-ahead (the next shuffle window fetched while one is
decoded). Runs interleave so all see the same machine.

    python benchmarks/bucket_loader.py [--rows 4000] [--k 64] [--workers 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch

from train_common import command_line, print_ratio_table, synthetic_cache


class LatencyProxy:
    """A TCP proxy in front of the S3 server that holds each request chunk for `delay` seconds:
    a stand-in for the round trip to a real bucket, which a server on 127.0.0.1 does not have."""

    def __init__(self, target: tuple[str, int], delay: float):
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, 0.0), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, delay):
        try:
            while data := src.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def start_s3_server(latency_ms: float):
    """moto's S3 server on 127.0.0.1 (optionally behind LatencyProxy), with the AWS_* variables
    pointing kdcache at it: (server, endpoint URL). Stop it with server.stop()."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    if latency_ms:
        port = LatencyProxy((host, port), latency_ms / 1000).port
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return server, endpoint


def positions_per_second(cache, *, batch_size: int, workers: int) -> float:
    from kdcache.cache.stream import CacheStream, StreamLoader
    loader = StreamLoader(CacheStream(cache, batch_size=batch_size, seed=0, num_workers=workers))
    n = 0
    start = time.perf_counter()
    for batch in loader:
        n += len(batch["labels"])
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to each request (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    server, endpoint = start_s3_server(args.latency_ms)
    try:
        work = Path(tempfile.mkdtemp(prefix="kdcache_bucket_"))
        local = synthetic_cache(work / "mlm", rows=args.rows, length=args.length, k=args.k, vocab_size=args.vocab,
                                task="mlm")
        s3 = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        s3.create_dir("bench")
        pafs.copy_files(str(local), "bench/mlm", destination_filesystem=s3)
        remote = "s3://bench/mlm"
        print(f"# {command_line()}")
        positions_per_second(local, batch_size=args.batch_size, workers=args.workers)  # warm-up
        from kdcache.cache import stream as stream_module
        rates = {"local disk": [], "bucket, one window read ahead": [],
                 "bucket, no read-ahead": []}
        for _ in range(args.repeats):
            rates["local disk"].append(positions_per_second(local, batch_size=args.batch_size, workers=args.workers))
            for name, ahead in (("bucket, one window read ahead", True),
                                ("bucket, no read-ahead", False)):
                stream_module.BUCKET_READ_AHEAD = ahead  # the forked loader workers inherit it
                rates[name].append(positions_per_second(remote, batch_size=args.batch_size, workers=args.workers))
            stream_module.BUCKET_READ_AHEAD = True
        print(f"| source (bucket: moto on 127.0.0.1, +{args.latency_ms:g} ms per request) | loader positions/s "
              f"({args.workers} workers, k = {args.k}, {args.rows:,} rows, median of {args.repeats}) | vs local |")
        print_ratio_table(rates, "local disk")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
