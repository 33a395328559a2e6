"""`train-student --out s3://...` (gs://, hdfs://): train into a local staging folder, mirror it into the bucket.

A bucket has no rename, so nothing is replaced in place: every object is uploaded whole, and each
unit gets a marker uploaded after everything it vouches for (docs/FORMAT.md, "Writing to a store
without rename"). Layout under the prefix OUT:

  OUT/checkpoints/step-NNNNNNNNN/   model.safetensors, trainer.pt, rank*.pt, then meta.json (the marker)
  OUT/metrics.jsonl, OUT/train_summary.json   re-uploaded after each checkpoint, the summary last
  OUT/config.json, model.safetensors, tokenizer files ...   the finished student, then train_summary.json
                                    with done=true (its marker); then OUT/checkpoints/ is removed

A checkpoint prefix without meta.json (an upload killed halfway) is never resumed from: `--resume`
downloads the newest complete one into a fresh staging folder and continues exactly as on disk.
One process only: torchrun ranks would each need the others' rank files in their staging folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..cache.manifest import enclosing_cache
from ..cache.storage import ObjectPath, check_writable, location
from ..errors import KdcacheError
from . import checkpoint
from .loop import METRICS, SUMMARY

CHECKPOINTS = "checkpoints"
MARKER = "meta.json"  # a checkpoint's marker, as locally (checkpoint.find_checkpoint)


def _read_json(path: ObjectPath) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_checkpoint(remote: ObjectPath) -> ObjectPath | None:
    """The newest complete checkpoint under OUT/checkpoints/ (its marker uploaded), if any."""
    complete = [p for p in (remote / CHECKPOINTS).iterdir() if p.name.startswith("step-") and (p / MARKER).is_file()]
    return max(complete, key=lambda p: p.name) if complete else None


@contextmanager
def _one_line(failure: str, advice: str):
    """A transfer that fails is one line: what failed, why, and what to do (nothing half-done is kept)."""
    try:
        yield
    except OSError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise KdcacheError(f"{failure} ({reason}); {advice}") from None


def _uploading(what: str, uri: str):
    return _one_line(f"cannot upload {what} to {uri}", "the bucket keeps its last complete checkpoint: fix the cause "
                     "(endpoint, credentials, space) and re-run with --resume")


def _downloading(what: str, uri: str):
    """The staging folder is discarded; the bucket is unchanged."""
    return _one_line(f"cannot download {what} from {uri}", "check the endpoint, credentials and bucket, then re-run "
                     "the same command")


class BucketOut:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.remote = location(self.uri)
        self.staging = Path(tempfile.mkdtemp(prefix="kdcache-student-"))

    def fetch(self) -> dict | None:
        """Into staging: what the run's checks and --resume read (summary, metrics, newest complete
        checkpoint). Returns the bucket's summary."""
        with _downloading("the run's progress files and newest checkpoint", self.uri):
            summary = _read_json(self.remote / SUMMARY)
            for name in (SUMMARY, METRICS):
                if (self.remote / name).is_file():
                    (self.remote / name).download_to(self.staging / name)
            newest = latest_checkpoint(self.remote)
            if newest is not None:
                newest.copy_to(self.staging / checkpoint.CHECKPOINT)
        return summary

    def _put(self, local: Path, name: str) -> None:
        if name != SUMMARY:  # streamed: model.safetensors may be several GB
            (self.remote / name).upload_file(local)
            return
        summary = json.loads(local.read_text())  # the run was configured with the staging folder: record the bucket
        summary.setdefault("args", {})["out"] = self.uri
        (self.remote / name).write_bytes((json.dumps(summary, indent=2) + "\n").encode())

    def upload_progress(self) -> None:
        with _uploading("metrics.jsonl and train_summary.json", self.uri):
            for name in (METRICS, SUMMARY):
                if (self.staging / name).is_file():
                    self._put(self.staging / name, name)

    def upload_checkpoint(self, local: Path) -> None:
        """checkpoint.save's hook: the new checkpoint as whole objects, its marker last; then the
        progress files; then older checkpoints (only once the new one is complete)."""
        step = checkpoint.read_meta(local)["step"]
        with _uploading(f"the checkpoint of step {step}", self.uri):
            self._upload_checkpoint(local, self.remote / CHECKPOINTS / f"step-{step:09d}")

    def _upload_checkpoint(self, local: Path, dest: ObjectPath) -> None:
        for file in sorted(p for p in local.iterdir() if p.is_file() and p.name != MARKER):
            (dest / file.name).upload_file(file)
        (dest / MARKER).upload_file(local / MARKER)
        self.upload_progress()
        for other in (self.remote / CHECKPOINTS).iterdir():
            if other.name != dest.name:
                other.remove_tree()

    def upload_student(self) -> None:
        """The finished student's files, train_summary.json (done) last; then the checkpoints go."""
        with _uploading("the finished student", self.uri):
            self._upload_student()

    def _upload_student(self) -> None:
        names = sorted(p.name for p in self.staging.iterdir() if p.is_file() and p.name != SUMMARY)
        for name in names:
            self._put(self.staging / name, name)
        self._put(self.staging / SUMMARY, SUMMARY)
        (self.remote / CHECKPOINTS).remove_tree()


def check_bucket_out(uri: str, cache) -> None:
    """Refusals made before anything is trained or written."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KdcacheError(f"--out {uri}: training into a bucket runs in one process; under torchrun use a local "
                           "(shared) --out and copy the finished student up")
    remote = location(uri)
    inside = enclosing_cache(remote)
    if inside is not None:
        raise KdcacheError(f"--out {uri} is inside the cache {inside}: the student's files would mix with the "
                           "cache's; choose an --out outside the cache")
    if str(location(cache)).startswith(str(remote) + "/"):  # both as normalised URIs (no query, no trailing /)
        raise KdcacheError(f"--cache {cache} is inside --out {uri}: replacing the student would lose it; choose an "
                           "--out that does not hold the cache")
    check_writable(remote)


def train_into_bucket(uri: str, cache, run) -> dict:
    """`run(staging folder)` trains as for a local --out; this mirrors it into the bucket at `uri`."""
    check_bucket_out(uri, cache)
    out = BucketOut(uri)
    try:
        before = out.fetch() or {}
        checkpoint.ON_SAVED[str(out.staging)] = out.upload_checkpoint
        try:
            summary = run(out.staging)
        except KdcacheError as e:  # messages name the staging folder: name the bucket instead
            raise KdcacheError(str(e).replace(str(out.staging), out.uri)) from None
        finally:
            checkpoint.ON_SAVED.pop(str(out.staging), None)
        summary.setdefault("args", {})["out"] = out.uri
        if summary.get("done") and not before.get("done"):
            out.upload_student()
        elif not summary.get("done"):
            out.upload_progress()  # the summary written after the session's last checkpoint
        return summary
    finally:
        shutil.rmtree(out.staging, ignore_errors=True)


def fetch_student(uri: str) -> Path:
    """`evaluate --model s3://...`: the student's files in a local folder (copied once per process).
    A prefix whose train_summary.json says the run is unfinished holds no complete student yet."""
    from ..cache.storage import local_dir

    remote = location(uri.rstrip("/"))
    summary = _read_json(remote / SUMMARY)
    if summary is not None and not summary.get("done"):
        raise KdcacheError(f"--model {uri} holds an unfinished train-student run (step {summary.get('steps')} of "
                           f"{summary.get('total_steps')}); finish it with `kdcache train-student ... --out {uri} --resume`")
    if not (remote / "config.json").is_file():
        raise KdcacheError(f"--model {uri} holds no model (no config.json); point at a finished train-student --out")
    with _downloading("the student", uri):
        return local_dir(remote)
