"""Prepare as a map over slices: byte-identical for 1/2/3 tasks, resume, half-written slices, merge
errors, and every input format (local and over HTTP, and `hf:` streamed by `datasets` from local files)."""

import dataclasses
import functools
import glob
import gzip
import http.server
import json
import os
import shutil
import threading

import pytest

from scale_hyper.config.schema import DataConfig
from scale_hyper.prepare import ensure_prepared, sources
from scale_hyper.prepare import main as prepare
from scale_hyper.prepare.slices import PrepareError

# 100 stdlib documents in slices of 15 documents: 7 slices
SMALL = dict(source="stdlib", max_documents=100, vocab_size=512, seq_len=64, num_workers=0, slice_documents=15)


def _cfg(out, **kw) -> DataConfig:
    return DataConfig(output=str(out), **{**SMALL, **kw})


def _files(root):
    return {
        os.path.relpath(p, root): open(p, "rb").read()
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(p)
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One task, two local processes."""
    cfg = _cfg(tmp_path_factory.mktemp("ref") / "data", prepare_workers=2)
    m = ensure_prepared(cfg, seed=5)
    assert m["slices"] == 7 and len(m["splits"]["train"]["shards"]) >= 16
    return cfg, _files(cfg.output)


@pytest.mark.parametrize("tasks", [2, 3])
def test_tasks_give_identical_bytes(reference, tmp_path, tasks):
    cfg = _cfg(tmp_path / "data", prepare_workers=1)
    results = [prepare.prepare(cfg, seed=5, task=i, tasks=tasks) for i in range(tasks)]
    assert all(r == {} for r in results[:-1]) and results[-1]["slices"] == 7  # the last one merges
    assert _files(cfg.output) == reference[1]


# `scale-hyper prepare` killed for real: 50 slices of 2 documents, so that the work left after the first
# finished slice (seconds) is far longer than the test takes to notice it and send SIGKILL.
KILLED = ["data.source=stdlib", "data.max_documents=100", "data.vocab_size=512", "data.seq_len=64",
          "data.num_workers=0", "data.slice_documents=2", "data.prepare_workers=1", "train.seed=5"]  # fmt: skip


def test_resume_after_a_kill(tmp_path, capsys):
    """SIGKILL once a slice is done (no hook: the process dies wherever it is, maybe mid-slice), then
    the same command again: finished slices are not redone, and the bytes are an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    from scale_hyper.config import load_config

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scale_hyper", "prepare", *KILLED, f"data.output={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not glob.glob(os.path.join(out, "slices", "0*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    done = sorted(glob.glob(os.path.join(out, "slices", "0*.json")))
    assert 1 <= len(done) < 50 and not os.path.exists(os.path.join(out, "manifest.json")), len(done)
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    assert prepare.main(load_config([*KILLED, f"data.output={out}"])) == 0  # run again: resumes
    assert {p: os.stat(p).st_mtime_ns for p in done} == mtimes, "finished slices are not redone"
    assert prepare.main(load_config([*KILLED, f"data.output={tmp_path}/straight"])) == 0
    capsys.readouterr()
    leftovers = [p for p in _files(out) if ".tmp" in p]  # a write the kill cut short (never read)
    assert _files(out).keys() - set(leftovers) == _files(tmp_path / "straight").keys()
    assert {k: v for k, v in _files(out).items() if k not in leftovers} == _files(tmp_path / "straight")


def test_half_written_and_stale_slices_are_redone(reference, tmp_path):
    cfg = _cfg(tmp_path / "data")
    shutil.copytree(reference[0].output, cfg.output)
    out = cfg.output
    os.remove(os.path.join(out, "manifest.json"))
    # slice 2: shards written, killed before its partial manifest (one shard cut short, a temp file left)
    os.remove(os.path.join(out, "slices", "000002.json"))
    with open(os.path.join(out, "train-000002-0000.tar"), "r+b") as f:
        f.truncate(1000)
    open(os.path.join(out, "train-000002-0001.tar.tmp123"), "wb").write(b"partial")
    open(os.path.join(out, "slices", "000002.json.tmp123"), "wb").write(b"")  # killed while writing it
    # slice 4: a stale partial from another tokenizer
    p4 = os.path.join(out, "slices", "000004.json")
    stale = json.load(open(p4))
    stale["tokenizer"] = "0" * 64
    json.dump(stale, open(p4, "w"))
    with pytest.raises(PrepareError, match=r"slices/000002\.json.*resumes"):
        prepare.merge_only(cfg, seed=5)  # a slice missing at merge time
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    ensure_prepared(cfg, seed=5)
    assert _files(out) == reference[1]  # the temp files of the killed writer removed with the redo


def test_merge_refuses_foreign_slices(reference, tmp_path):
    cfg = _cfg(tmp_path / "data")
    shutil.copytree(reference[0].output, cfg.output)
    os.remove(os.path.join(cfg.output, "manifest.json"))
    p1 = os.path.join(cfg.output, "slices", "000001.json")
    good = open(p1).read()
    partial = json.loads(good)
    partial["tokenizer"] = "f" * 64
    json.dump(partial, open(p1, "w"))
    with pytest.raises(PrepareError, match=r"000001\.json was made with another tokenizer.*delete .*000001\.json"):
        prepare.merge_only(cfg, seed=5)
    partial = json.loads(good)
    partial["config"]["seq_len"] = 128
    json.dump(partial, open(p1, "w"))
    with pytest.raises(PrepareError, match=r"000001\.json was made with other settings \(data\.seq_len=128 there"):
        prepare.merge_only(cfg, seed=5)
    assert not os.path.exists(os.path.join(cfg.output, "manifest.json"))
    # a plan made with other settings: named, with the fix
    with pytest.raises(PrepareError, match=r"a prepare plan prepared differently: data\.slice_documents=15 there"):
        prepare.get_plan(dataclasses.replace(cfg, slice_documents=10), 5, create=True)


def test_cli_tasks_and_env(reference, tmp_path, capsys, monkeypatch):
    from scale_hyper.config import load_config

    out = tmp_path / "data"
    data = {**SMALL, "output": out, "prepare_workers": 1}
    run = load_config([*(f"data.{k}={v}" for k, v in data.items()), "train.seed=5"])
    assert prepare.main(run, step="merge") == 2 and "run `scale-hyper prepare CONFIG` first" in capsys.readouterr().err
    assert prepare.main(run, step="plan") == 0 and "planned 7 slices" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert prepare.task_from_env(None, None) == (1, 2)
    assert prepare.task_from_env(0, 3) == (0, 3)  # --task/--tasks win
    assert prepare.main(run) == 0 and "the last task to finish writes" in capsys.readouterr().out
    assert prepare.main(run, step="merge") == 2 and "slices are not finished" in capsys.readouterr().err
    assert prepare.main(run, task=0, tasks=2) == 0 and "prepared" in capsys.readouterr().out
    assert _files(out) == reference[1]
    with pytest.raises(PrepareError, match="--task 2"):
        prepare.main(run, task=2, tasks=2)


# --- input formats ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 80 documents as .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet (3 row groups) and 2 .jsonl parts."""
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("corpus")
    docs = [" ".join(topics[k].split()) for k in sorted(topics)][:80]  # one line each: .txt keeps them whole
    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs))
    (root / "c.txt").write_text("\n\n".join(docs) + "\n")
    (root / "c.jsonl").write_text(lines)
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.write(lines)
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, root / "c.parquet", row_group_size=30)
    pq.write_table(table.rename_columns(["id", "content"]), root / "nocol.parquet")
    os.makedirs(root / "parts")
    half = len(lines.splitlines(True)) // 2
    (root / "parts" / "a.jsonl").write_text("".join(lines.splitlines(True)[:half]))
    (root / "parts" / "b.jsonl").write_text("".join(lines.splitlines(True)[half:]))
    return root, docs


def _docs(cfg):
    plan = sources.plan_slices(cfg)
    assert [s["id"] for s in plan] == list(range(len(plan)))
    return [d for sl in plan for d in sources.slice_documents(cfg, sl)], plan


@pytest.mark.parametrize(
    "name, kinds",
    [("c.txt", {"bytes"}), ("c.jsonl", {"bytes"}), ("c.jsonl.gz", {"file"}), ("c.jsonl.zst", {"file"}),
     ("c.parquet", {"rowgroups"})],
)  # fmt: skip
def test_file_formats_give_the_same_documents(corpus, tmp_path, name, kinds):
    root, docs = corpus
    cfg = _cfg(tmp_path, source=str(root / name), text_field="body", max_documents=0, slice_bytes=8192)
    got, plan = _docs(cfg)
    assert got == docs and {s["kind"] for s in plan} == kinds
    if kinds != {"file"}:
        assert len(plan) >= 3  # cut into byte ranges / row groups, and no document lost or repeated


def test_remote_files_over_http(corpus, tmp_path):
    root, docs = corpus
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("c.jsonl.zst", "c.parquet", "c.txt"):
            cfg = _cfg(tmp_path, source=f"{base}/{name}", text_field="body", max_documents=0)
            got, plan = _docs(cfg)
            assert got == docs and [s["kind"] for s in plan] == ["file"]
        cfg = _cfg(tmp_path / "out", source=f"{base}/c.jsonl.gz", text_field="body", max_documents=0)
        m = ensure_prepared(cfg, seed=1)
        assert m["source"]["files"] == [[f"{base}/c.jsonl.gz", None]]
        assert m["documents"]["train"] + m["documents"]["val"] == len(docs)
    finally:
        server.shutdown()


def test_hf_streaming_from_local_files(corpus, tmp_path, monkeypatch):
    """`datasets` in streaming mode on local files: two files = two slices (its shards), one = counted blocks."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, docs = corpus
    common = dict(text_field="body", max_documents=0, slice_documents=25)
    two = _cfg(tmp_path, source="hf:json", hf_data_files=str(root / "parts" / "*.jsonl"), **common)
    got, plan = _docs(two)
    assert got == docs and [s["kind"] for s in plan] == ["hf_shard", "hf_shard"]
    pq_one = _cfg(tmp_path, source="hf:parquet", hf_data_files=str(root / "c.parquet"), **common)
    got, plan = _docs(pq_one)
    assert got == docs and [s["kind"] for s in plan] == ["docs"] * 4
    m = ensure_prepared(dataclasses.replace(two, output=str(tmp_path / "hf"), min_shards=4), seed=1)
    assert m["slices"] == 2 and m["documents"]["train"] + m["documents"]["val"] == len(docs)


def test_prepare_parquet_and_zst_end_to_end(corpus, tmp_path):
    root, docs = corpus
    cfg = _cfg(tmp_path / "pq", source=str(root / "c.parquet"), text_field="body", max_documents=0, min_shards=4,
               slice_bytes=8192)  # fmt: skip
    m = ensure_prepared(cfg, seed=1)  # its 3 row groups of ~70 KB: a slice each
    assert m["slices"] == 3 and m["slice_files"] == [1, 1, 1]
    assert m["documents"]["train"] + m["documents"]["val"] == len(docs)
    z = ensure_prepared(dataclasses.replace(cfg, output=str(tmp_path / "z"), source=str(root / "c.jsonl.zst")), 1)
    assert z["splits"]["train"]["tokens"] + z["splits"]["val"]["tokens"] > 0 and z["slices"] == 1


def test_parquet_without_the_text_column(corpus, tmp_path):
    root, _ = corpus
    cfg = _cfg(tmp_path / "out", source=str(root / "nocol.parquet"), text_field="body", max_documents=0)
    with pytest.raises(ValueError, match=r"nocol\.parquet has no column data\.text_field='body' .*'content'"):
        ensure_prepared(cfg)
    assert not os.path.exists(tmp_path / "out"), "nothing is written"


def test_task_from_slurm_environment(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert prepare.task_from_env(None, None) == (0, 1), "the batch script of a 4-task job is one task: everything"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert prepare.task_from_env(None, None) == (3, 4), "task 3 of an srun step of 4"


def test_bench_prepare_measures_and_agrees(tmp_path):
    from scale_hyper.bench import prepare as bench

    r = bench.measure(_cfg(tmp_path / "unused", max_documents=60), seed=1)
    assert r["slices"] == 4 and r["identical"] == 1.0  # 1 and 2 processes wrote the same manifest
    assert r["tokens"] > 0 and r["tokens_per_s_1"] > 0 and r["tokens_per_cpu_s_2"] > 0


@pytest.mark.slow
def test_sliced_prepare_into_s3_resumes_and_matches_local(reference, s3, monkeypatch):
    """data.output=s3://… on the local S3-compatible server: 2 tasks, one interrupted, then resumed."""
    from scale_hyper.data import storage

    cfg = _cfg(s3.url("data"), prepare_workers=1)
    assert prepare.prepare(cfg, seed=5, task=0, tasks=2) == {}  # plan + slices 0, 2, 4, 6
    # What a task killed in its second slice leaves in the store: slice 1 complete (its partial manifest
    # written last), slice 3's first shard written, no partial for slices 3 and 5. Made by running task 1's
    # first slice alone (task 1 of 6 has slice 1 only; of 2 it has 1, 3, 5) and writing the cut-short shard.
    assert prepare.run_task(cfg, prepare.get_plan(cfg, 5, create=False), 1, 6) == 1
    storage.write_bytes(storage.join(cfg.output, "train-000003-0000.tar"), b"cut short by the kill", False)
    assert "manifest.json" not in s3.keys("data") and "slices/000001.json" in s3.keys("data")
    assert "slices/000003.json" not in s3.keys("data")
    m = prepare.prepare(cfg, seed=5, task=1, tasks=2)
    assert m["slices"] == 7 and m["location"] == s3.url("data")
    want = reference[1]
    assert s3.keys("data") == sorted(want)
    assert all(storage.read_bytes(storage.join(cfg.output, k), False) == v for k, v in want.items())
