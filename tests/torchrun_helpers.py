"""Launching kdcache under torchrun in tests: one agent (one node), or two agents on this machine
standing in for two nodes that meet at a c10d rendezvous on 127.0.0.1."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from conftest import single_thread_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncodes: list[int]
    outputs: list[str]   # stdout + stderr of each agent (and its workers)
    seconds: float

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes)

    @property
    def text(self) -> str:
        return "\n".join(self.outputs)


def torchrun(target: list[str], *, nnodes: int = 1, nproc_per_node: int = 2, timeout: float = 300) -> Launch:
    """Run `python -m torch.distributed.run ... target` as `nnodes` agents on this machine.

    target: ["-m", "kdcache", ...] or [script, ...]. Several agents share one c10d rendezvous
    endpoint, as the agents of separate nodes would (each with its own --node-rank).
    """
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    procs = []
    start = time.perf_counter()
    for node in range(nnodes):
        if nnodes == 1:
            where = ["--standalone"]
        else:
            where = ["--nnodes", str(nnodes), "--node-rank", str(node), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(nproc_per_node),
               *map(str, target)]
        procs.append(subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs, codes = [], []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            outputs.append(out)
            codes.append(proc.returncode)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Launch(codes, outputs, time.perf_counter() - start)
