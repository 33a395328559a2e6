"""Caches in an object store: read through pyarrow's S3 filesystem from a real S3 API server
(moto's standalone server, started on 127.0.0.1 by the fixture), compared with the same cache on disk."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from conftest import shakespeare_lines, single_thread_env
from dump_helpers import assert_same_rows, dump, manifest, read_rows
from kdcache.cache.storage import ObjectPath, location
from kdcache.cache.stream import CacheStream, open_cache
from kdcache.errors import KdcacheError
from kdcache.train.evaluate import evaluate
from stage2_helpers import cli_error, cli_ok

BUCKET = "kd-bucket"


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API on a random local port; the standard AWS variables point at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_bert_mlm, s3_server):
    """A real dump on disk, and the same files uploaded to s3://kd-bucket/caches/mlm."""
    root = tmp_path_factory.mktemp("storage")
    (root / "lines.txt").write_text("\n".join(shakespeare_lines(160)) + "\n")
    local = root / "cache"
    dump(tiny_bert_mlm, root / "lines.txt", local, "--max-length", 32, "--targets", "top-k", "--top-k", 8, "--shard-rows", 16,
         "--no-progress")
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    pafs.copy_files(str(local), f"{BUCKET}/caches/mlm", destination_filesystem=s3)
    return {"local": local, "uri": f"s3://{BUCKET}/caches/mlm", "root": root, "teacher": tiny_bert_mlm}


def test_object_paths_answer_like_local_paths(caches):
    remote, local = location(caches["uri"]), caches["local"]
    assert isinstance(remote, ObjectPath) and str(remote) == caches["uri"]
    assert remote.is_dir() and (remote / "manifest.json").is_file() and not (remote / "nothing").exists()
    shard = "data/part-00001.parquet"
    assert (remote / shard).stat().st_size == (local / shard).stat().st_size
    assert json.loads((remote / "manifest.json").read_text()) == json.loads((local / "manifest.json").read_text())


def test_streaming_from_the_bucket_gives_the_local_batches(caches):
    # Two DataLoader worker processes each open the bucket themselves.
    def batches(where):
        from kdcache.cache.stream import StreamLoader
        loader = StreamLoader(CacheStream(where, batch_size=8, seed=2, num_workers=2, shuffle_buffer=24))
        return list(loader)

    remote, local = batches(caches["uri"]), batches(caches["local"])
    assert len(remote) == len(local) > 3
    for a, b in zip(remote, local):
        assert a.keys() == b.keys()
        for key in a:
            assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key


def test_train_and_evaluate_from_the_bucket_equal_local(caches, tmp_path):
    args = ["--student", "L2-H128", "--layers", 1, "--hidden", 32, "--heads", 2, "--intermediate", 64,
            "--batch-size", 8, "--max-steps", 6, "--num-workers", 2, "--no-progress", "--seed", 1]
    cli_ok(["train-student", "--cache", caches["uri"], "--out", tmp_path / "remote", *args])
    cli_ok(["train-student", "--cache", caches["local"], "--out", tmp_path / "local", *args])
    a, b = load_file(tmp_path / "remote" / "model.safetensors"), load_file(tmp_path / "local" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "remote" / "train_summary.json").read_text())
    assert summary["done"] and summary["cache"] == caches["uri"]
    # The student carries the cache's tokenizer, fetched from the bucket.
    assert sorted(p.name for p in (tmp_path / "remote").glob("tokenizer*")) == \
        sorted(p.name for p in (tmp_path / "local").glob("tokenizer*"))
    remote = evaluate(tmp_path / "remote", caches["uri"], device="cpu")
    local = evaluate(tmp_path / "remote", caches["local"], device="cpu")
    assert {k: v for k, v in remote.items() if k != "cache"} == {k: v for k, v in local.items() if k != "cache"}


def test_inspect_and_verify_read_the_bucket(caches):
    remote = json.loads(cli_ok(["inspect", caches["uri"], "--json"]))
    local = json.loads(cli_ok(["inspect", caches["local"], "--json"]))
    assert remote.pop("cache") == caches["uri"]
    local.pop("cache")
    assert remote == local and remote["rows"] > 0
    assert f"verified in {caches['uri']}" in cli_ok(["verify", caches["uri"]])



def _report_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r["student"]: r for r in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                      for line in lines[2:])}


def test_sweep_and_report_from_the_bucket_equal_local(caches, tmp_path):
    """`sweep --cache s3://...` and `report --eval-cache s3://...` give the rows the same cache on disk gives."""
    from kdcache.sweep.amortise import cache_tokens

    student = ["--students", "tiny=L2-H128", "--gpus", "cpu", "--layers", 1, "--hidden", 32, "--heads", 2,
               "--intermediate", 64, "--batch-size", 8, "--max-steps", 2, "--num-workers", 0, "--no-progress",
               "--seed", 1]
    reports = {}
    for where, cache in (("remote", caches["uri"]), ("local", caches["local"])):
        runs = tmp_path / where
        cli_ok(["sweep", "--cache", cache, "--out", runs, *student])
        record = json.loads((runs / "tiny" / "sweep.json").read_text())
        assert record["identity"]["cache"] == (cache if where == "remote" else str(cache.resolve()))
        printed = cli_ok(["report", runs, "--eval-cache", cache])
        assert f"evaluating tiny on {cache}" in printed
        eval_record = json.loads((runs / "tiny" / "eval.json").read_text())
        assert eval_record["key"]["eval_cache"] == (cache if where == "remote" else str(cache.resolve()))
        reports[where] = (runs / "report.md").read_text()
        # The sweep is resumable from the bucket as from disk: the finished student is skipped.
        assert "finished already" in cli_ok(["sweep", "--cache", cache, "--out", runs, *student])
    remote, local = _report_rows(reports["remote"]), _report_rows(reports["local"])
    assert set(remote) == {"tiny", "teacher"}
    for rows in (remote, local):  # throughput is a timing; every other cell must match
        for row in rows.values():
            row.pop("train tokens/s")
    assert remote == local
    amortisation = [r.split("## Amortisation")[1].split("![")[0] for r in (reports["remote"], reports["local"])]
    assert amortisation[0] == amortisation[1] and "Amortisation:" in amortisation[0]
    assert cache_tokens(caches["uri"]) == cache_tokens(caches["local"]) > 0
    assert not list(pathlib.Path.cwd().glob("s3:*"))  # nothing written under a folder named "s3:"

def test_bucket_problems_are_one_line_errors(caches, s3_server):
    message = cli_error(["train-student", "--cache", f"s3://{BUCKET}/caches/none", "--student", "L2-H128",
                         "--out", caches["root"] / "x", "--max-steps", 1])
    assert f"s3://{BUCKET}/caches/none" in message and "does not exist" in message
    # A shard whose object is not the size the manifest records is named, as on disk.
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    pafs.copy_files(f"{BUCKET}/caches/mlm", f"{BUCKET}/caches/broken", source_filesystem=s3, destination_filesystem=s3)
    with s3.open_output_stream(f"{BUCKET}/caches/broken/data/part-00002.parquet") as f:
        f.write(b"PAR1 not really")
    with pytest.raises(KdcacheError, match=r"part-00002.parquet of cache s3://kd-bucket/caches/broken is corrupt"):
        open_cache(f"s3://{BUCKET}/caches/broken")
    message = cli_error(["verify", f"s3://{BUCKET}/caches/broken"])
    assert "part-00002.parquet" in message and "size 15 bytes" in message
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    # Dumping into a bucket that does not exist says so in one line, before the teacher runs.
    message = cli_error(["dump-logits", "--teacher", caches["teacher"], "--out", "s3://no-such-bucket/c",
                         "--data", caches["root"] / "lines.txt", "--no-progress"])
    assert "--out s3://no-such-bucket/c is not writable" in message and "bucket" in message, message


DUMP_ARGS = ["--max-length", 32, "--targets", "top-k", "--top-k", 8, "--shard-rows", 8, "--max-tokens-per-batch", 128]


@pytest.fixture(scope="module")
def local_dump(tmp_path_factory, tiny_bert_mlm):
    """A corpus and its dump on local disk: what every dump into the bucket must equal."""
    root = tmp_path_factory.mktemp("local_dump")
    corpus = root / "lines.txt"
    corpus.write_text("\n".join(shakespeare_lines(600)) + "\n")
    dump(tiny_bert_mlm, corpus, root / "cache", *DUMP_ARGS)
    return corpus, root / "cache"


def test_dump_to_a_bucket_survives_kill_9_and_equals_a_local_dump(tmp_path, tiny_bert_mlm, s3_server, local_dump,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus, local = local_dump
    uri, prefix = f"s3://{BUCKET}/dumped/mlm", f"{BUCKET}/dumped/mlm"
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    args = ["dump-logits", "--teacher", tiny_bert_mlm, "--data", corpus, "--out", uri, "--no-progress", *DUMP_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *map(str, args)], env=single_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and \
            s3.get_file_info(f"{prefix}/data/_part-00000.stats.json").type != pafs.FileType.File:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the dump finished before it could be killed"
    killed = json.loads(location(uri + "/manifest.json").read_text())
    assert killed["complete"] is False and len(killed["shards"]) < killed["num_shards"]

    dump(tiny_bert_mlm, corpus, uri, *DUMP_ARGS)  # the same command resumes
    copy = tmp_path / "copy"
    pafs.copy_files(prefix, str(copy), source_filesystem=s3)
    assert manifest(copy)["complete"] is True
    assert_same_rows(read_rows(copy), read_rows(local))
    assert [s["sha256"] for s in manifest(copy)["shards"]] == [s["sha256"] for s in manifest(local)["shards"]]
    # The tokenizer and the teacher config went up too, byte for byte.
    for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "teacher/config.json"):
        assert (copy / name).read_bytes() == (local / name).read_bytes(), name
    assert list(tmp_path.glob("s3*")) == []  # no local folder named "s3:"
    assert f"verified in {uri}" in cli_ok(["verify", uri])

    # Stage two trains from the dumped bucket.
    cli_ok(["train-student", "--cache", uri, "--out", tmp_path / "student", "--student", "L2-H128", "--layers", 1,
            "--hidden", 32, "--heads", 2, "--intermediate", 64, "--batch-size", 8, "--max-steps", 2, "--no-progress"])
    assert json.loads((tmp_path / "student" / "train_summary.json").read_text())["done"]

    # --overwrite semantics hold in a bucket: a different cache is refused, then replaced on request.
    message = cli_error([*args[:-len(DUMP_ARGS)], *DUMP_ARGS, "--limit", 40])
    assert "holds a different cache" in message and "--overwrite" in message
    dump(tiny_bert_mlm, corpus, uri, *DUMP_ARGS, "--limit", 40, "--overwrite")
    fresh = json.loads(location(uri + "/manifest.json").read_text())
    names = sorted(p.name for p in location(uri + "/data").iterdir())
    assert fresh["complete"] and len(names) == 2 * fresh["num_shards"] < 2 * killed["num_shards"]


def test_torchrun_two_processes_dump_into_a_bucket_like_one_local_process(tmp_path, tiny_bert_mlm, s3_server, local_dump):
    corpus, local = local_dump
    prefix = f"{BUCKET}/dumped/torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdcache",
           "dump-logits", "--teacher", tiny_bert_mlm, "--data", corpus, "--out", f"s3://{prefix}", "--no-progress",
           *DUMP_ARGS]
    result = subprocess.run(list(map(str, cmd)), env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    copy = tmp_path / "copy"
    pafs.copy_files(prefix, str(copy), source_filesystem=pafs.S3FileSystem(endpoint_override=s3_server))
    assert manifest(copy)["complete"] is True and manifest(copy)["dump"]["world_size"] == 2
    assert_same_rows(read_rows(copy), read_rows(local))


# ------------------------------------------------------------------ issue 16, defect 2: students in a bucket

STUDENT = ["--student", "L2-H128", "--layers", 1, "--hidden", 32, "--heads", 2, "--intermediate", 64,
           "--batch-size", 8, "--max-steps", 4, "--num-workers", 0, "--no-progress", "--seed", 1]


def bucket_names(s3, prefix: str) -> list[str]:
    infos = s3.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_train_student_into_a_bucket_resumes_from_it_and_evaluates_from_it(caches, s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    uri, prefix = f"s3://{BUCKET}/students/a", f"{BUCKET}/students/a"
    train = ["train-student", "--cache", caches["local"], "--out", uri, *STUDENT]
    cli_ok([*train, "--stop-after-steps", 2])
    names = bucket_names(s3, prefix)
    assert "checkpoints/step-000000002/meta.json" in names and "model.safetensors" not in names, names
    assert json.loads(location(uri + "/train_summary.json").read_text())["done"] is False
    # Not resuming a run that is there is refused, naming the bucket (not the staging folder).
    message = cli_error(train)
    assert f"--out {uri} already holds a checkpoint" in message and "--resume" in message, message
    # An upload killed halfway (a newer step with no marker) is never resumed from.
    s3.open_output_stream(f"{prefix}/checkpoints/step-000000003/model.safetensors").close()
    cli_ok([*train, "--resume"])
    names = bucket_names(s3, prefix)
    assert not [n for n in names if n.startswith("checkpoints/")], names
    assert {"config.json", "model.safetensors", "metrics.jsonl", "train_summary.json"} <= set(names)
    summary = json.loads(location(uri + "/train_summary.json").read_text())
    assert summary["done"] and summary["steps"] == 4 and summary["args"]["out"] == uri
    # Bit for bit the student an uninterrupted local run makes.
    cli_ok(["train-student", "--cache", caches["local"], "--out", tmp_path / "local", *STUDENT])
    with s3.open_input_stream(f"{prefix}/model.safetensors") as f:
        (tmp_path / "remote.safetensors").write_bytes(f.read())
    a, b = load_file(tmp_path / "remote.safetensors"), load_file(tmp_path / "local" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # evaluate --model s3://... reads it.
    remote = json.loads(cli_ok(["evaluate", "--model", uri, "--cache", caches["local"], "--json"]))
    local = json.loads(cli_ok(["evaluate", "--model", tmp_path / "local", "--cache", caches["local"], "--json"]))
    assert remote.pop("model") == uri and local.pop("model") == str(tmp_path / "local") and remote == local
    cli_ok([*train, "--resume"])  # a finished run: nothing to do, nothing in the bucket changes
    assert bucket_names(s3, prefix) == names
    assert not list(tmp_path.glob("s3*"))  # never a local folder named "s3:"


def test_bucket_outputs_that_are_not_supported_are_refused_in_one_line(caches, s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    message = cli_error(["sweep", "--cache", caches["local"], "--students", "tiny=L2-H128", "--out",
                         f"s3://{BUCKET}/sweeps/x", "--gpus", "cpu", "--max-steps", 1])
    assert "must be local" in message and "train-student --out s3://" in message
    assert "must be a local sweep folder" in cli_error(["report", f"s3://{BUCKET}/sweeps/x", "--eval-cache",
                                                         caches["local"]])
    message = cli_error(["train-student", "--cache", caches["uri"], "--out", f"s3://{BUCKET}/caches/mlm/student",
                         *STUDENT])
    assert "inside the cache" in message
    for holder in (f"s3://{BUCKET}/caches/", f"s3://{BUCKET}/caches?region=us-east-1"):  # however the prefix is written
        assert "is inside --out" in cli_error(["train-student", "--cache", caches["uri"], "--out", holder, *STUDENT])
    message = cli_error(["train-student", "--cache", caches["local"], "--out", "s3://no-such-bucket/s", *STUDENT])
    assert "not writable" in message
    # evaluate on a run that has not finished says so.
    uri = f"s3://{BUCKET}/students/unfinished"
    cli_ok(["train-student", "--cache", caches["local"], "--out", uri, *STUDENT, "--stop-after-steps", 1])
    assert "unfinished train-student run" in cli_error(["evaluate", "--model", uri, "--cache", caches["local"]])
    assert bucket_names(s3, f"{BUCKET}/sweeps") == []
    assert not list(tmp_path.glob("s3*"))


def test_a_failed_upload_is_one_line_and_the_bucket_keeps_its_last_complete_checkpoint(caches, s3_server, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"s3://{BUCKET}/students/flaky"
    train = ["train-student", "--cache", caches["local"], "--out", uri, *STUDENT, "--save-every", 1]
    cli_ok([*train, "--stop-after-steps", 1])
    # A download that fails (the resume's checkpoint) is one line as well.
    monkeypatch.setattr(ObjectPath, "copy_to", lambda self, dest: (_ for _ in ()).throw(OSError("simulated: timeout")))
    message = cli_error([*train, "--resume"])
    assert f"cannot download the run's progress files and newest checkpoint from {uri} (simulated: timeout)" in message
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    real = ObjectPath.upload_file

    def failing(self, local):
        if "step-000000002" in self.path and self.name == "trainer.pt":
            raise OSError("simulated: connection reset")
        real(self, local)

    monkeypatch.setattr(ObjectPath, "upload_file", failing)
    message = cli_error([*train, "--resume"])
    assert f"cannot upload the checkpoint of step 2 to {uri} (simulated: connection reset)" in message, message
    assert "kdcache-student-" not in message  # the bucket is named, not the staging folder
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # The half-uploaded step 2 has no marker: the resume continues from step 1 and finishes.
    cli_ok([*train, "--resume"])
    assert json.loads(location(uri + "/train_summary.json").read_text())["steps"] == 4


class _SpyStream:
    """A bucket stream that records the size of every read and write."""
    def __init__(self, stream, sizes):
        self.stream, self.sizes = stream, sizes

    def read(self, nbytes=None):
        data = self.stream.read(nbytes)
        self.sizes.append(len(data))
        return data

    def write(self, data):
        self.sizes.append(len(data))
        return self.stream.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


class _SpyFilesystem:
    """The bucket's filesystem, its streams spied on (pyarrow's own classes cannot be patched)."""
    def __init__(self, filesystem, sizes):
        self.filesystem, self.sizes = filesystem, sizes

    def __getattr__(self, name):
        return getattr(self.filesystem, name)

    def open_input_stream(self, path):
        return _SpyStream(self.filesystem.open_input_stream(path), self.sizes.setdefault(("down", path), []))

    def open_output_stream(self, path):
        return _SpyStream(self.filesystem.open_output_stream(path), self.sizes.setdefault(("up", path), []))


def test_train_into_a_bucket_streams_files_in_chunks_both_ways(s3_server, tmp_path, monkeypatch):
    """A student of several GB must not need that much RAM: no file is read whole, every piece
    sent or received is at most a chunk, and the bytes round-trip exactly."""
    from kdcache.cache import storage
    from kdcache.train import bucket_out, checkpoint

    monkeypatch.setattr(storage, "CHUNK", 4096)
    whole = []
    for cls in (pathlib.Path, ObjectPath):
        real = cls.read_bytes
        monkeypatch.setattr(cls, "read_bytes", lambda self, real=real: whole.append(str(self)) or real(self))
    sizes = {}
    uri = f"s3://{BUCKET}/students/streamed"

    def spied(out):
        out.remote = ObjectPath(_SpyFilesystem(out.remote.filesystem, sizes), out.remote.path, out.remote.scheme)
        return out

    weights = os.urandom(50_000)  # a dozen chunks
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "model.safetensors").write_bytes(weights)
    (local / "meta.json").write_text(json.dumps({"step": 7}))
    up = spied(bucket_out.BucketOut(uri))
    up.upload_checkpoint(local)  # the checkpoint's files, then its marker
    down = spied(bucket_out.BucketOut(uri))
    down.fetch()  # what --resume downloads
    (up.staging / "model.safetensors").write_bytes(weights)
    (up.staging / "config.json").write_text("{}")
    (up.staging / "train_summary.json").write_text(json.dumps({"done": True, "args": {}}))
    up.upload_student()
    student = bucket_out.fetch_student(uri)  # what evaluate --model s3://... downloads
    read_whole = list(whole)
    monkeypatch.undo()
    got = down.staging / checkpoint.CHECKPOINT / "model.safetensors"
    assert got.read_bytes() == weights and (student / "model.safetensors").read_bytes() == weights
    big = {p: n for p, n in sizes.items() if p[1].endswith("model.safetensors")}
    assert len(big) == 3, sizes.keys()  # checkpoint up, checkpoint down, student up
    assert all(n and max(n) <= 4096 and sum(n) == len(weights) for n in big.values()), big
    assert not [p for p in read_whole if p.endswith("model.safetensors")], read_whole
    for out in (up, down):
        shutil.rmtree(out.staging)
