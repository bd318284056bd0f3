"""s3:// end to end against a real S3-compatible server (moto's server mode, started once per session
by tests/s3_server.py) through the real client (s3fs): prepare writes there, the loader and a 2-rank
DeepSpeed training stream from it, a connection dropped mid-shard (a real cut on a real socket, by a
proxy between client and server) is retried or fails with one line naming the shard, and the resume
position survives the failure. An unreachable endpoint, a missing bucket and missing credentials are
each one line naming the URL and the fix, exit 2, before anything is written."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from launch import REPO, rank_env, run_ranks, scale_hyper
from s3_server import DroppingProxy

from scale_hyper.config import errors
from scale_hyper.config.schema import DataConfig
from scale_hyper.data import load_tokenizer, storage, train_loader
from scale_hyper.data import s3 as s3client
from scale_hyper.data import shards as shardlib
from scale_hyper.prepare import ensure_prepared
from scale_hyper.prepare.shard_writer import manifest_bytes, write_arrays

SMALL = dict(max_documents=30, vocab_size=256, seq_len=32, min_shards=4, prepare_workers=1, num_workers=0)
V, S = 1000, 16


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.fixture
def proxy(s3, monkeypatch):
    """This process's S3 client goes through a proxy that can drop connections (set with .drop)."""
    p = DroppingProxy(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.endpoint)
    yield p
    p.close()


def _synthetic(base: str, shards: int = 4, n: int = 64):
    rng = np.random.default_rng(0)
    return write_arrays(base, {"train": [rng.integers(5, V, size=(n, S)) for _ in range(shards)]}, V)


def _read(manifest, i: int) -> np.ndarray:
    entry = manifest["splits"]["train"]["shards"][i]
    return shardlib.read_shard(
        storage.join(manifest["location"], entry["name"]), name=entry["name"], dtype=manifest["dtype"],
        seq_len=manifest["seq_len"], sequences=entry["sequences"], vocab_size=manifest["vocab_size"],
        sequences_per_block=manifest["sequences_per_block"],
    )  # fmt: skip


def test_prepare_writes_to_s3_and_the_loader_streams_the_same_batches_as_from_disk(s3, tmp_path):
    cfg = DataConfig(output=s3.url("run1"), **SMALL)
    manifest = ensure_prepared(cfg, seed=0)  # no manifest on the store yet: a missing key, not an error
    keys = s3.keys("run1")
    assert "manifest.json" in keys and "tokenizer/tokenizer.json" in keys
    assert {s["name"] for s in manifest["splits"]["train"]["shards"]} <= set(keys)
    local = DataConfig(output=str(tmp_path / "local"), **SMALL)
    assert manifest_bytes(ensure_prepared(local, seed=0)) == manifest_bytes(manifest)  # same bytes
    again = ensure_prepared(cfg, seed=0)  # found on the store this time
    assert again["location"] == s3.url("run1") and again["splits"] == manifest["splits"]
    a = _take(train_loader(cfg, manifest, seed=0, rank=0, world_size=1, micro_batch_size=8), 4)
    b = _take(train_loader(local, shardlib.load_manifest(local.output), seed=0, rank=0, world_size=1,
                           micro_batch_size=8), 4)  # fmt: skip
    assert _same(a, b)
    assert load_tokenizer(manifest).mask_token_id == 4


def test_a_connection_dropped_mid_shard_is_retried(s3, proxy):
    manifest = _synthetic(s3.url("d"))
    want = [_read(manifest, i) for i in range(2)]
    rule = proxy.drop(b".tar ", after=900, times=3)  # the next 3 shard GETs are cut after 900 bytes
    got = [_read(manifest, i) for i in range(2)]
    assert len(rule.dropped) == 3, proxy.gets
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_store_that_keeps_dropping_fails_with_one_line_naming_the_shard_never_skipped(s3, proxy):
    manifest = _synthetic(s3.url("d"))
    proxy.drop(b"train-000001.tar ", after=900, times=None)
    started = time.perf_counter()
    with pytest.raises(storage.RemoteStorageError) as caught:
        _read(manifest, 1)
    assert time.perf_counter() - started < 30
    line = errors.one_line(caught.value)
    assert errors.is_user_error(caught.value) and f"{s3.url('d')}/train-000001.tar" in line, line
    assert f"failed after {s3client.ATTEMPTS} attempts" in line and "AWS_ENDPOINT_URL_S3" in line
    # data.on_corrupt=skip skips a corrupt shard; a store that fails is not a corrupt shard
    cfg = DataConfig(output=s3.url("d"), num_workers=0, on_corrupt="skip")
    with pytest.raises(storage.RemoteStorageError, match="train-000001.tar"):
        _take(train_loader(cfg, manifest, seed=0, rank=0, world_size=1, micro_batch_size=64), 4)


def test_a_failed_write_leaves_no_object_and_no_open_upload(s3, monkeypatch):
    import boto3

    monkeypatch.setattr(s3client, "WRITE_BLOCK", 5 << 20)  # S3's smallest part: 6 MiB make a multipart upload
    for name, size in (("small.bin", 100), ("large.bin", 6 << 20)):
        with pytest.raises(KeyboardInterrupt):
            with storage.open_write(s3.url(name), False) as f:
                f.write(b"x" * size)
                raise KeyboardInterrupt  # e.g. Ctrl-C while a shard is being written
    assert s3.keys() == []
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    storage.write_bytes(s3.url("ok.bin"), b"y" * 10, False)
    assert s3.keys() == ["ok.bin"]


def test_a_remote_file_is_seekable_for_random_access(s3):
    """A parquet corpus on the store can be read by row group (footer first) without copying it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(1000)]}), buf, row_group_size=100)
    storage.write_bytes(s3.url("corpus.parquet"), buf.getvalue(), False)
    with storage.open_read(s3.url("corpus.parquet"), False) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(7).column(0).to_pylist()[:2] == ["doc 700", "doc 701"]


def _prepare_cli(tmp_path: Path, output: str, env: dict) -> subprocess.CompletedProcess:
    args = [f"data.output={output}", "data.max_documents=30", "data.vocab_size=256", "data.seq_len=32"]
    full = {k: v for k, v in rank_env(0, 1, 0, {**env, "PYTHONPATH": str(REPO)}).items()
            if k in env or not k.startswith("AWS_")}  # fmt: skip
    return subprocess.run(scale_hyper("prepare", *args), cwd=tmp_path, env=full, text=True,
                          capture_output=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("case", ["endpoint", "bucket", "credentials"])
def test_an_unreachable_bucket_is_one_line_with_the_url_and_the_fix_exit_2_nothing_written(s3, tmp_path, case):
    env = s3.env()
    output = s3.url("out")
    if case == "endpoint":
        env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"  # nothing listens on the discard port
        fix = "cannot reach the S3 endpoint http://127.0.0.1:9"
    elif case == "bucket":
        output = "s3://no-such-bucket/out"
        fix = "bucket 'no-such-bucket' of s3://no-such-bucket/out/manifest.json does not exist"
    else:
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        fix = "no usable AWS credentials"
    proc = _prepare_cli(tmp_path, output, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and fix in last and output in last, proc.stderr
    assert "AWS_ENDPOINT_URL_S3" in last or "AWS_PROFILE" in last or "create it" in last
    assert "Traceback" not in proc.stderr
    assert s3.keys("out") == [] and not (tmp_path / "data").exists()  # nothing written anywhere


# --- 2 DeepSpeed ranks (gloo, CPU) streaming from the store ----------------------------------------

STEPS = 8
TRAIN = [
    "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=16", "model.num_layers=2",
    "train.micro_batch_size=8", "train.global_batch_size=0", "train.log_every=1", "train.eval_batches=2",
    "train.eval_every=1000", "deepspeed.precision=fp32", "train.lr=3e-3", f"train.max_steps={STEPS}",
    "train.save_every=4", "train.export=false", "tracking.enabled=false", "train.keep_checkpoints=2",
]  # fmt: skip


def _env(server, endpoint: Optional[str] = None) -> dict:
    return {**server.env(endpoint), "PYTHONPATH": str(REPO)}  # this checkout, whatever is installed


@pytest.fixture(scope="module")
def sources(s3_server, tmp_path_factory):
    """Two datasets prepared onto the store by the CLI: x (trains the tokenizer) and y (x's tokenizer,
    copied from the store: data.tokenizer is a local directory), for a weighted mixture."""
    wd = tmp_path_factory.mktemp("s3train")
    base = f"s3://{s3_server.bucket}/train-module"

    def prepare(name: str, *extra: str) -> None:
        args = scale_hyper("prepare", *TRAIN, f"data.output={base}/{name}", *extra)
        proc = subprocess.run(args, cwd=wd, env=rank_env(0, 1, 0, _env(s3_server)), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    prepare("x", "data.max_documents=400")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            data = storage.read_bytes(f"{base}/x/tokenizer/{name}", False)
            (wd / "tok").mkdir(exist_ok=True)
            (wd / "tok" / name).write_bytes(data)
    prepare("y", "data.max_documents=200", f"data.tokenizer={wd / 'tok'}")
    return wd, base


def _train(wd: Path, base: str, out: str, endpoint: str, server, *extra: str):
    mix = f"data.mixture=[{{output: {base}/x, weight: 0.7}}, {{output: {base}/y, weight: 0.3}}]"
    args = scale_hyper("train", *TRAIN, mix, f"train.output_dir={wd / out}", *extra)
    return run_ranks(args, 2, wd, timeout=300, extra_env=_env(server, endpoint))


def _losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.mark.slow
def test_two_ranks_train_on_a_mixture_from_s3_and_a_store_failure_loses_no_position(sources, s3_server):
    """Reference: 8 steps on x × 0.7 + y × 0.3, both streamed from the store (checkpoint at step 4).
    Resumed from that checkpoint while the store drops every shard GET mid-body: it fails with one
    line naming a shard, and the checkpoint is as it was. Resumed from it again, through drops that
    retries absorb: steps 5-8 have exactly the reference's losses."""
    wd, base = sources
    reference = _train(wd, base, "reference", s3_server.endpoint, s3_server)
    assert [p.returncode for p in reference] == [0, 0], reference[0].stdout[-4000:]
    assert f"data: mixture of {base}/x × 0.7, {base}/y × 0.3" in reference[0].stdout
    step4 = wd / "reference" / "checkpoints" / "step_4"
    before = _files(step4)

    proxy = DroppingProxy(s3_server.endpoint)
    try:
        proxy.drop(b".tar ", after=900, times=None)
        failed = _train(wd, base, "resumed", proxy.endpoint, s3_server, f"train.resume={step4}")
        text = "\n".join(p.stdout for p in failed)
        assert 2 in [p.returncode for p in failed] and all(p.returncode != 0 for p in failed), text[-4000:]
        lines = [ln for ln in text.splitlines() if ln.startswith("scale-hyper: error:")]
        assert lines and f"{base}/" in lines[0] and ".tar failed after" in lines[0], text[-4000:]
        assert _files(step4) == before  # the resume position is untouched
        assert not list((wd / "resumed").glob("checkpoints/step_*"))

        rule = proxy.drop(b".tar ", after=900, times=4)  # transient now: absorbed by retries
        resumed = _train(wd, base, "resumed", proxy.endpoint, s3_server, f"train.resume={step4}")
        assert [p.returncode for p in resumed] == [0, 0], resumed[0].stdout[-4000:]
        assert f"resumed from {step4} at step 4" in resumed[0].stdout and len(rule.dropped) == 4
    finally:
        proxy.close()
    assert _losses(wd / "resumed") == {s: v for s, v in _losses(wd / "reference").items() if s > 4}
