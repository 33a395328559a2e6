"""The reason to cache: one teacher pass paid once vs the teacher forwards N online-KD runs would pay."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Amortisation:
    dump_seconds: float           # the one teacher pass that wrote the train cache
    teacher_tokens_per_second: float  # measured teacher forward rate during that dump
    student_tokens: list[int]     # tokens each cached-KD student trained on
    measured_online: list[tuple[str, float, str, float]]  # (online run, seconds, cached run, seconds)
    dump_estimated: bool = False  # the record covers part of the cache (torchrun: rank 0's share): time = cache tokens / rate

    @property
    def online_teacher_seconds(self) -> float:
        """Teacher time N online-KD runs would spend: every student token needs a teacher forward."""
        return sum(self.student_tokens) / self.teacher_tokens_per_second

    @property
    def ratio(self) -> float:
        return self.online_teacher_seconds / self.dump_seconds

    def lines(self) -> list[str]:
        n = len(self.student_tokens)
        took = ("would take" if self.dump_estimated else "took")
        out = [
            f"Teacher paid once: the dump {took} {self.dump_seconds:.1f} s "
            f"({self.teacher_tokens_per_second:,.0f} tokens/s teacher forward, measured"
            + ("; the dump's record covers part of the cache (rank 0 of a multi-process dump), so its time is "
               "the cache's tokens at that rate)." if self.dump_estimated else ")."),
            f"Online KD would run the teacher over every token each student trains on: {n} student"
            f"{'s' if n != 1 else ''} × {sum(self.student_tokens) / max(n, 1):,.0f} tokens on average = "
            f"{sum(self.student_tokens):,} tokens ÷ {self.teacher_tokens_per_second:,.0f} tokens/s = "
            f"{self.online_teacher_seconds:.1f} s of teacher forwards.",
            f"Amortisation: {self.online_teacher_seconds:.1f} s online ÷ {self.dump_seconds:.1f} s cached = "
            f"**{self.ratio:.2f}×** teacher time saved by caching"
            + (" (below 1: these students see fewer tokens than the cache holds; more students or epochs raise it)."
               if self.ratio < 1 else "."),
        ]
        for online, online_s, cached, cached_s in self.measured_online:
            out.append(
                f"Measured side by side: `{online}` (online KD, teacher in the loop) trained in {online_s:.1f} s, "
                f"`{cached}` (same student and steps, from the cache) in {cached_s:.1f} s: "
                f"{online_s / cached_s:.2f}× the wall time.")
        return out


def amortisation(manifest: dict, runs, cache_tokens: int | None = None) -> Amortisation | None:
    """From the train cache's manifest and the finished runs; None when the manifest lacks dump timing.

    The manifest's `dump` block sums every session of the cache, but under torchrun it holds rank 0's
    figures only; when it covers fewer tokens than the cache holds, the one-pass (single-process)
    teacher time is the cache's tokens at the measured rate.
    """
    dump = manifest.get("dump") or {}
    seconds, rate, processed = dump.get("seconds"), dump.get("tokens_per_second"), dump.get("real_tokens")
    if not seconds or not rate:
        return None
    estimated = bool(cache_tokens and processed is not None and processed < cache_tokens)
    if estimated:
        seconds = cache_tokens / rate
    cached = [r for r in runs if r.mode == "cached KD"]
    tokens = [int(r.summary.get("tokens") or 0) for r in cached]
    measured = []
    for online in (r for r in runs if r.mode == "online KD"):
        twin = next((r for r in cached if r.summary.get("student") == online.summary.get("student")
                     and r.summary.get("steps") == online.summary.get("steps")), None)
        if twin and online.summary.get("seconds") and twin.summary.get("seconds"):
            measured.append((online.name, float(online.summary["seconds"]), twin.name, float(twin.summary["seconds"])))
    return Amortisation(float(seconds), float(rate), tokens, measured, estimated)


def cache_tokens(cache_dir) -> int:
    """Tokens the teacher saw for a cache: the summed lengths of every row's input_ids."""
    import pyarrow.compute as pc

    from ..cache.manifest import read_manifest_view, resolve_inside
    from ..cache.schema import INPUT_IDS
    from ..cache.storage import location, parquet_file

    # The shards the manifest lists (a local folder or a bucket prefix), as every reader takes them.
    cache_dir = location(cache_dir)
    total = 0
    for i, shard in enumerate(read_manifest_view(cache_dir).shards):
        path = resolve_inside(cache_dir, shard.get("file"), f"shards[{i}].file")
        column = parquet_file(path).read(columns=[INPUT_IDS]).column(INPUT_IDS)
        total += int(pc.sum(pc.list_value_length(column)).as_py() or 0)
    return total
