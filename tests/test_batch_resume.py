"""The global batch is the invariant (issue 12): the README's multi-rank command runs as written and
the micro batch is picked under its bound; a global batch the ranks cannot split fails before any work.
Real DeepSpeed on CPU ranks over gloo. (A resume with another micro batch, and one whose recipe
contradicts the checkpoint: tests/test_engine.py, which resumes a copy of its own 2-rank run.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, rank_env, run_ranks, scale_hyper

pytestmark = pytest.mark.slow

COMMON = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.log_every=1", "train.eval_batches=2", "train.eval_every=1000",
    "deepspeed.precision=fp32", "train.lr=3e-3", "train.export=false",
]  # fmt: skip


def train_args(wd: Path, name: str, *extra: str) -> list:
    return scale_hyper(
        "train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}",
        f"tracking.uri=sqlite:///{wd}/mlflow.db", *extra,
    )  # fmt: skip


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


def test_impossible_split_fails_before_any_work(tmp_path):
    """Refused before any work: no shards are prepared (there are none), no run directory is made."""
    workdir = tmp_path
    proc = run_ranks(train_args(workdir, "odd", "train.global_batch_size=15", "train.max_steps=2"), 2, workdir)
    for p in proc:
        assert p.returncode == 2, p.stdout[-3000:]
    assert "scale-hyper: error: train.global_batch_size=15 cannot be split evenly over 2 ranks — set" in proc[0].stdout
    assert not (workdir / "odd").exists() and not (workdir / "shards").exists()
