"""After a dump: every shard this cache needs must read back complete from --out, or the run fails.

A store can accept an upload and not keep it (a bucket policy, an endpoint answering for another
store, a disk that vanished): the run then wrote shards it cannot confirm, and exiting 0 with
`cache INCOMPLETE` in a summary line would let a pipeline go on with half a cache.
"""
from __future__ import annotations

import json

from ..cache.manifest import resolve_inside
from ..cache.schema import shard_name, shard_stats_name
from ..cache.storage import location
from ..errors import KdcacheError


def why_not_complete(out, index: int) -> str:
    """Why shard `index` does not count as complete in `out`, in a few words."""
    out = location(out)
    shard, sidecar = out / shard_name(index), out / shard_stats_name(index)
    try:
        if not shard.is_file():
            return f"{shard_name(index)} is not there"
        if not sidecar.is_file():
            return f"its sidecar {shard_stats_name(index)} is not there"
        stats = json.loads(sidecar.read_text())
        size = resolve_inside(out, stats["file"], f"{sidecar.name} file").stat().st_size
        if size != stats["bytes"]:
            return f"{shard_name(index)} reads back as {size} bytes, its sidecar says {stats['bytes']}"
    except (OSError, ValueError, KeyError, TypeError, KdcacheError) as e:
        return f"it does not read back ({(str(e).splitlines() or [type(e).__name__])[0]})"
    return "it does not read back"


def check_complete(manifest: dict, out) -> None:
    """Raise one line naming the shards of `manifest` (as re-read from `out`) that are not complete."""
    if manifest["complete"]:
        return
    have = {s["index"] for s in manifest["shards"]}
    missing = [i for i in range(manifest["num_shards"]) if i not in have]
    named = "; ".join(f"{shard_name(i)}: {why_not_complete(out, i)}" for i in missing[:3])
    more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise KdcacheError(
        f"the dump wrote its shards but {len(missing)} of {manifest['num_shards']} do not read back complete from "
        f"--out {out} ({named}{more}); the store did not keep what was written: check the endpoint, permissions "
        "and free space of --out, then re-run the same command (it rewrites only those shards)")
