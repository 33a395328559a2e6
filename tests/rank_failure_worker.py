"""A torchrun worker for tests/test_distributed.py: rank FAIL_RANK raises while the others wait.

argv: FAIL_RANK WHERE ERROR, with WHERE the collective the other ranks are waiting in when it
fails ("barrier": kdcache's polled barrier; "broadcast": a plain blocking torch collective, as
DDP's gradient all-reduce is; "compute": two minutes of work outside any collective, as a rank
stuck in a NCCL collective would be) and ERROR "kdcache" (a KdcacheError) or "bug" (a ValueError).
"""
import sys
import time

import torch.distributed as dist

from kdcache.distributed import setup
from kdcache.errors import KdcacheError

fail_rank, where, error = int(sys.argv[1]), sys.argv[2], sys.argv[3]
group = setup("cpu")
try:
    with group.failing_together():
        group.barrier()
        if group.rank == fail_rank:
            time.sleep(0.5)  # the others are inside the collective by now
            if error == "kdcache":
                raise KdcacheError("the shard on this node is unreadable (a test failure)")
            raise ValueError("a bug on this rank (a test failure)")
        if where == "barrier":
            group.barrier()
        elif where == "compute":
            time.sleep(120)
        else:
            dist.broadcast_object_list([None], src=fail_rank)
        group.sum(1.0)
except KdcacheError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
finally:
    group.close()
