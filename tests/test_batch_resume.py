"""The global batch is the invariant (issue 12): the README's multi-rank command runs as written, the
micro batch is picked under its bound, and a resume with another micro batch keeps the global batch,
the LR schedule and the data position; a resume that contradicts the checkpoint's recipe fails before
any work and leaves the run directory as it was. Real DeepSpeed on CPU ranks over gloo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, prepare_shards, rank_env, run_ranks, scale_hyper

pytestmark = pytest.mark.slow

COMMON = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.log_every=1", "train.eval_batches=2", "train.eval_every=1000",
    "deepspeed.precision=fp32", "train.lr=3e-3", "train.export=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return prepare_shards(tmp_path_factory.mktemp("batch"), COMMON)


def train_args(wd: Path, name: str, *extra: str) -> list:
    return scale_hyper(
        "train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}",
        f"tracking.uri=sqlite:///{wd}/mlflow.db", *extra,
    )  # fmt: skip


def metrics(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def ok(procs):
    for p in procs:
        assert p.returncode == 0, p.stdout[-6000:]
    return procs[0].stdout


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_readme_torchrun_line_runs_as_written(tmp_path):
    """README: `torchrun --nproc_per_node 2 -m scale_hyper train deepspeed.zero_stage=3` (+ train.max_steps=2):
    the defaults' micro 32 = global 32 now runs on 2 ranks as micro 16 × 2."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = rank_env(0, 1, free_port())
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)  # torchrun sets them
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "scale_hyper", "train", "deepspeed.zero_stage=3"]
    overlay = ["train.max_steps=2", "train.export=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = subprocess.run(cmd + overlay, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "global 32 sequences/step = micro 16 (bound train.micro_batch_size=32) × accumulation 1 × world 2" in out
    assert "training finished" in out


def test_impossible_split_fails_before_any_work(workdir):
    proc = run_ranks(train_args(workdir, "odd", "train.global_batch_size=15", "train.max_steps=2"), 2, workdir)
    for p in proc:
        assert p.returncode == 2, p.stdout[-3000:]
    assert "scale-hyper: error: train.global_batch_size=15 cannot be split evenly over 2 ranks — set" in proc[0].stdout
    assert not (workdir / "odd").exists()


def test_resume_with_another_micro_batch_keeps_global_batch_schedule_and_data(workdir):
    g16 = "train.global_batch_size=16"
    straight = ok(run_ranks(train_args(workdir, "straight", g16, "train.max_steps=8", "train.micro_batch_size=8"),
                            2, workdir))  # fmt: skip
    assert "micro 8 × accumulation 1 × world 2" in straight
    ok(run_ranks(train_args(workdir, "micro", g16, "train.max_steps=8", "train.micro_batch_size=8",
                            "train.stop_after_steps=4"), 2, workdir))  # fmt: skip
    resumed = ok(run_ranks(train_args(workdir, "micro", g16, "train.max_steps=8", "train.micro_batch_size=4"),
                           2, workdir))  # fmt: skip
    assert "resumed from" in resumed and "micro 4 × accumulation 2 × world 2" in resumed
    assert "none read twice" in resumed  # the data cursor was re-split at sample granularity
    a, b = metrics(workdir / "straight"), metrics(workdir / "micro")
    assert sorted(b) == list(range(1, 9))
    assert [b[s]["lr"] for s in range(1, 9)] == pytest.approx([a[s]["lr"] for s in range(1, 9)])  # the schedule
    assert [b[s]["tokens_seen"] for s in range(1, 9)] == [a[s]["tokens_seen"] for s in range(1, 9)]
    assert all(abs(b[s]["loss"] - a[s]["loss"]) < 0.5 for s in range(5, 9))  # continued, not restarted

    # A resume whose recipe contradicts the checkpoint: refused before any work, the run directory untouched.
    before = snapshot(workdir / "micro")
    for bad, key in (
        ("train.global_batch_size=32", "train.global_batch_size=16"),
        ("data.seq_len=32", "data.seq_len=64"),
    ):
        extra = [g16, "train.max_steps=12", bad] if "global" not in bad else ["train.max_steps=12", bad]
        procs = run_ranks(train_args(workdir, "micro", *extra), 2, workdir)
        for p in procs:
            assert p.returncode == 2, p.stdout[-3000:]
        err = procs[0].stdout
        assert f"scale-hyper: error: checkpoint {workdir / 'micro'}" in err and f"set {key} to continue it" in err
        assert "prepare" not in err and "world 2 (rank" not in err  # no data preparation, no engine
        assert snapshot(workdir / "micro") == before
