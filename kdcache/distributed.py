"""One process-group helper for both stages under torchrun (gloo on CPU, NCCL on CUDA).

Failing together: a rank that fails with any error writes its message to the rendezvous store
before it exits (`ProcessGroup.failing_together`). The other ranks never block blindly on it:
barriers and the small reductions here wait in short polls that also look for that message, and
a collective that breaks because the peer died (gloo: "connection closed") is reported with the
peer's message instead of the transport's; a rank blocked where nothing polls (DDP's gradient
all-reduce, a NCCL collective whose peer is gone, a long computation) is ended by a watchdog
thread that checks the store every second. Every rank stops within a few seconds, saying which
rank failed and why, and exits non-zero.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import KdcacheError

POLL_SECONDS = 0.05
STORE_POLL_SECONDS = 0.5
# How often a rank checks for a peer's failure while it computes (see _Watchdog).
WATCHDOG_SECONDS = 1.0
# How long a failing rank waits for the others to read its message before it exits.
DELIVERY_SECONDS = 3 * WATCHDOG_SECONDS
DELIVERY_MARGIN_SECONDS = 0.5
# How long a rank waits for a peer's failure message to appear once its own collective broke.
MESSAGE_GRACE_SECONDS = 5.0
# Backstop for collectives that are not polled (DDP's gradient all-reduce): a peer that hangs
# without failing ends the run after this long rather than never.
COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("KDCACHE_COLLECTIVE_TIMEOUT_MIN", "30")))


class PeerFailed(KdcacheError):
    """Another rank failed; its message, for this rank to stop with."""


@dataclass
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether this object initialised torch.distributed (and so tears it down)
    _acknowledged: bool = field(default=False, repr=False)  # this rank has read (or sent) the failure
    _peer_failure_raised: bool = field(default=False, repr=False)  # the main thread stops with it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def world(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- failure sharing ------------------------------------------------------------------------
    def _store(self):
        if not self.enabled or not dist.is_initialized():
            return None
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # a private accessor: without it, failures are still fatal, just less worded
            return None

    @property
    def _failure_key(self) -> str:
        # A restarted worker group (torchrun --max-restarts) must not read an earlier round's failure.
        return f"kdcache/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def peer_failure(self) -> str | None:
        store = self._store()
        if store is None:
            return None
        try:
            if store.check([self._failure_key]):
                message = store.get(self._failure_key).decode()
                if not self._acknowledged:  # tells the failing rank its message arrived here
                    store.add(self._failure_key + "/seen", 1)
                    self._acknowledged = True
                return message
        except Exception:  # the store's host is gone: nothing more to learn from it
            return None
        return None

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks why this one stops (first failure wins; never raises).

        The first failing rank then waits, briefly, until every other rank has read the message:
        the store may live in this node's torchrun agent, which ends soon after this process."""
        store = self._store()
        if store is None or isinstance(error, PeerFailed):
            return
        text = str(error).splitlines()[0] if str(error) else ""
        what = text if isinstance(error, KdcacheError) else f"{type(error).__name__}: {text}".rstrip(": ")
        message = f"rank {self.rank} failed: {what}"
        try:
            if store.compare_set(self._failure_key, "", message).decode() != message:
                # Another rank failed first; its message is the one the others report.
                if not self._acknowledged:
                    store.add(self._failure_key + "/seen", 1)
                    self._acknowledged = True
                return
            self._acknowledged = True
            deadline = time.monotonic() + DELIVERY_SECONDS
            while store.add(self._failure_key + "/seen", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            time.sleep(DELIVERY_MARGIN_SECONDS)  # read is not yet printed: let the others say it first
        except Exception:
            pass

    def _raise_peer_failure(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            message = self.peer_failure()
            if message is not None:
                self._peer_failure_raised = True
                raise PeerFailed(message)
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_SECONDS)

    def _wait(self, work) -> None:
        """Wait for an async collective, stopping early when a peer reports a failure."""
        try:
            next_check = time.monotonic() + STORE_POLL_SECONDS
            while not work.is_completed():
                # The store is asked less often than the collective: thousands of ranks may wait.
                if time.monotonic() >= next_check:
                    self._raise_peer_failure()
                    next_check = time.monotonic() + STORE_POLL_SECONDS
                time.sleep(POLL_SECONDS)
            work.wait()
        except PeerFailed:
            raise
        except Exception:  # the transport broke because a peer died: prefer the peer's own words
            self._raise_peer_failure(wait=MESSAGE_GRACE_SECONDS)
            raise

    @contextmanager
    def failing_together(self):
        """Run a stage so that an error on this rank stops every rank with its message."""
        watchdog = _Watchdog(self) if self.enabled else None
        try:
            yield self
        except PeerFailed:
            raise
        except Exception as e:
            if watchdog is not None:
                watchdog.stop()  # this rank is failing already: let it say why itself
            if self.enabled and not isinstance(e, KdcacheError):
                # Perhaps a collective broke because a peer died: then say what the peer said.
                try:
                    self._raise_peer_failure(wait=MESSAGE_GRACE_SECONDS if _looks_like_transport(e) else 0)
                except PeerFailed as peer:
                    raise peer from None
            self.report_failure(e)
            raise
        finally:
            if watchdog is not None:
                watchdog.stop()

    # -- collectives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            self._wait(dist.barrier(async_op=True))

    def _reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, value: float) -> float:
        """Sum of a number over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._reduce_device())
        self._wait(dist.all_reduce(t, async_op=True))
        return float(t.item())

    def share_error(self, message: str | None) -> None:
        """Rank 0's validation outcome, raised on every rank."""
        if self.enabled:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            raise KdcacheError(message)

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
            self.started = False


class _Watchdog:
    """Ends this process when another rank reports a failure while this one is blocked where no
    poll runs: inside DDP's gradient all-reduce, or a NCCL collective whose peer is gone (NCCL
    would wait for the collective timeout). Prints the peer's message like the CLI does."""

    def __init__(self, group: ProcessGroup):
        self.group, self.done = group, threading.Event()
        self.thread = threading.Thread(target=self._run, name="kdcache-peer-watchdog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        own = f"rank {self.group.rank} failed"
        while not self.done.wait(WATCHDOG_SECONDS):
            message = self.group.peer_failure()
            if message is not None and not message.startswith(own):
                if self.done.is_set() or self.group._peer_failure_raised:
                    return  # the main thread is already stopping with it
                # At once: this node's agent may stop this process as soon as the failing node's
                # agent (which may hold the store) is gone.
                print(f"error: {message}", file=sys.stderr, flush=True)
                os._exit(PeerFailed.exit_code)

    def stop(self) -> None:
        self.done.set()


def _looks_like_transport(error: BaseException) -> bool:
    text = str(error).lower()
    return any(s in text for s in ("connection", "closed", "reset by peer", "gloo", "nccl", "timed out", "broken pipe"))


def resolve_device(device: str | None, local_rank: int, world: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KdcacheError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else 0)
    return dev


def setup(device: str | None = "cpu", *, backend: str | None = None) -> ProcessGroup:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and pick this rank's device.

    `backend`: None picks NCCL on CUDA and gloo otherwise; "gloo" forces gloo (stage one only
    needs barriers, which gloo does on the CPU whatever the device).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), timeout=COLLECTIVE_TIMEOUT)
        started = True
    return ProcessGroup(rank, world, local, dev, started)
