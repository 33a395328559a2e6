"""The registry of target kinds (manifest["targets"]["kind"]): one module per kind owns its columns,
dump-time encoding, checks, decoding, loss weights and `inspect` numbers (see kinds/base.py).

Adding a kind: a module with a TargetKind subclass, plus one line in `KINDS` below.
"""
from __future__ import annotations

from ...errors import KdcacheError
from .base import TargetKind, id_type, smallest_uint
from .sample import Sample
from .topk import TopK
from .topk_sample import TopKSample

KINDS: dict[str, TargetKind] = {}


def register(kind: TargetKind) -> TargetKind:
    """Make `kind` known to every reader and writer (tests register toy kinds this way)."""
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    KINDS.pop(name, None)


register(TopK())
register(Sample())
register(TopKSample())


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def kind_of(name: str) -> TargetKind:
    """The kind called `name`; an unknown name (a newer kdcache's cache, a typo) is a one-line error."""
    try:
        return KINDS[name]
    except KeyError:
        raise KdcacheError(f"target kind {name!r} is not one this kdcache knows ({', '.join(KINDS)}); "
                           "upgrade kdcache or re-dump the cache with one of those") from None


def kind_for_columns(names) -> TargetKind | None:
    """The kind whose soft-target columns a table holds (the one with the most of them all present;
    its draws' log-probs may be absent: --no-draw-logprobs), or None when it holds none (a stream
    reading labels only)."""
    present = set(names)
    best = None
    for kind in KINDS.values():
        if set(kind.stored_columns(False)) <= present and (best is None or len(kind.columns) > len(best.columns)):
            best = kind
    return best


__all__ = ["KINDS", "TargetKind", "id_type", "kind_for_columns", "kind_names", "kind_of", "register",
           "smallest_uint", "unregister"]
