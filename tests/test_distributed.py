"""A rank that fails brings the others down promptly, with its message, under torchrun."""
from __future__ import annotations

from pathlib import Path

import pytest

from torchrun_helpers import torchrun

WORKER = Path(__file__).with_name("rank_failure_worker.py")


@pytest.mark.parametrize("nnodes,nproc,fail_rank,where,error,message", [
    # One node; the others wait in kdcache's polled barrier; a user-facing error.
    (1, 2, 1, "barrier", "kdcache", "rank 1 failed: the shard on this node is unreadable (a test failure)"),
    # Two agents standing in for two nodes (torchrun does not stop the other node's workers); the
    # store's own node fails with a bug while the other waits in a plain blocking collective.
    (2, 1, 0, "broadcast", "bug", "rank 0 failed: ValueError: a bug on this rank (a test failure)"),
    # The other node is busy outside any collective (or stuck in one that never errors): the watchdog ends it.
    (2, 1, 1, "compute", "kdcache", "rank 1 failed: the shard on this node is unreadable (a test failure)"),
])
def test_a_failing_rank_stops_the_others_with_its_message(nnodes, nproc, fail_rank, where, error, message):
    # A hang would run into the timeout (TimeoutExpired fails the test); a prompt stop takes seconds.
    launch = torchrun([WORKER, fail_rank, where, error], nnodes=nnodes, nproc_per_node=nproc, timeout=90)
    assert not launch.ok
    # The surviving rank says which rank failed and why, as a one-line error, not a gloo traceback.
    assert f"error: {message}" in launch.text, launch.text[-3000:]
