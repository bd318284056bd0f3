"""`scale-hyper train` end to end: real DeepSpeed on CPU ranks over gloo, real shards, a real
MLflow sqlite store. Each test drives the CLI the way a user (or srun/torchrun) would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import free_port, prepare_shards, run_ranks, scale_hyper, start_ranks

pytestmark = pytest.mark.slow

COMMON = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.micro_batch_size=8", "train.global_batch_size=0", "train.log_every=1",
    "train.eval_batches=2", "train.eval_every=1000", "deepspeed.precision=fp32", "train.lr=3e-3",
]  # fmt: skip


def losses(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One prepared shard set shared by the tests (preparing is not what they test)."""
    return prepare_shards(tmp_path_factory.mktemp("engine"), COMMON)


def train_args(wd: Path, name: str, *extra: str) -> list:
    return scale_hyper(
        "train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}",
        f"tracking.uri=sqlite:///{wd}/mlflow.db", *extra,
    )  # fmt: skip


def ok(procs):
    for p in procs:
        assert p.returncode == 0, p.stdout[-6000:]
    return procs[0].stdout


def test_reentrant_checkpointing_rejected_with_reason(workdir):
    proc = subprocess.run(
        train_args(workdir, "reentrant", "train.activation_checkpointing=reentrant"),
        cwd=workdir, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "non_reentrant" in proc.stderr and "already been reduced" in proc.stderr


def test_resume_is_bit_exact_on_two_ranks(workdir):
    straight = ok(run_ranks(train_args(workdir, "straight", "train.max_steps=8", "deepspeed.zero_stage=2"), 2, workdir))
    assert "training finished" in straight
    first = ok(run_ranks(train_args(workdir, "resumed", "train.max_steps=8", "deepspeed.zero_stage=2",
                                    "train.stop_after_steps=4"), 2, workdir))  # fmt: skip
    assert "checkpoint saved" in first and "training finished" not in first
    second = ok(run_ranks(train_args(workdir, "resumed", "train.max_steps=8", "deepspeed.zero_stage=2"), 2, workdir))
    assert "resumed from" in second and "step_4" in second
    a, b = losses(workdir / "straight"), losses(workdir / "resumed")
    assert sorted(b) == list(range(1, 9))  # no step lost or repeated
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-identical


def test_mlflow_run_continues_and_holds_what_was_promised(workdir):
    from mlflow import MlflowClient

    state = json.loads((workdir / "resumed" / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(state["mlflow_run_id"])
    params = run.data.params
    assert params["model.mixer"] == "hyperbert" and params["world_size"] == "2"
    assert params["ds_config.zero_optimization.stage"] == "2" and "git_commit" in params
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 9))  # one run across the resume, steps continuing
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert {m.step for m in val} >= {0, 8}
    for metric in ("lr", "tokens_per_s", "samples_per_s", "grad_norm", "skipped_steps"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json"} <= artifacts
    assert run.info.status == "FINISHED"


def test_export_loads_with_auto_class_and_fills_masks(workdir):
    hf = workdir / "straight" / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    code = (
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline\n"
        f"m = AutoModelForMaskedLM.from_pretrained(r'{hf}', trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained(r'{hf}')\n"
        "out = pipeline('fill-mask', model=m, tokenizer=t)(f'the {t.mask_token} of the module')\n"
        "assert len(out) == 5 and all(0 <= o['score'] <= 1 for o in out), out\n"
        "print('FILLED', out[0]['token_str'])\n"
    )
    # Run from an empty directory without the repo on the path: the custom code must travel with the model.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=workdir, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "FILLED" in proc.stdout, proc.stderr[-3000:]


def test_zero_to_fp32_inside_checkpoint_works(workdir):
    ckpt = workdir / "straight" / "checkpoints" / "step_8"
    script = ckpt.parent / "zero_to_fp32.py"
    if not script.exists():
        script = ckpt / "zero_to_fp32.py"
    out = workdir / "fp32"
    proc = subprocess.run([sys.executable, str(script), str(ckpt.parent), str(out), "--tag", "step_8"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(out.iterdir())


def test_resume_at_other_world_size_needs_universal_then_works(workdir):
    g16 = "train.global_batch_size=16"  # the invariant: 8 × 2 ranks, then 8 × accumulation 2 × 1 rank
    ok(run_ranks(train_args(workdir, "uni", "train.max_steps=8", "deepspeed.zero_stage=3", g16,
                            "train.stop_after_steps=4", "train.activation_checkpointing=non_reentrant"), 2, workdir))  # fmt: skip
    refused = run_ranks(train_args(workdir, "uni", "train.max_steps=8", "deepspeed.zero_stage=3", g16), 1, workdir)[0]
    assert refused.returncode == 2
    assert "saved by 2 ranks" in refused.stdout and "scale-hyper checkpoint universal" in refused.stdout
    ckpt = workdir / "uni" / "checkpoints" / "step_4"
    conv = subprocess.run(
        scale_hyper("checkpoint", "universal", str(ckpt)), cwd=workdir, capture_output=True, text=True
    )
    assert conv.returncode == 0, conv.stdout[-3000:] + conv.stderr[-3000:]
    resumed = ok(run_ranks(train_args(workdir, "uni", "train.max_steps=8", "deepspeed.zero_stage=3", g16), 1, workdir))
    assert "step_4_universal" in resumed and "training finished" in resumed
    assert "micro 8 × accumulation 2 × world 1" in resumed and "none read twice" in resumed
    steps = losses(workdir / "uni")
    assert sorted(steps) == list(range(1, 9))
    assert abs(steps[5] - steps[4]) < 1.0  # continued training, not a restart from scratch


def test_dead_rank_stops_the_others_with_a_named_rank(workdir):
    procs = start_ranks(
        train_args(workdir, "dead", "train.max_steps=100000", "train.dist_timeout_minutes=1"), 2, workdir
    )
    metrics = workdir / "dead" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(1)
    assert metrics.exists(), "training never started"
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    out, _ = procs[0].communicate(timeout=180)
    assert time.time() - start < 120
    assert procs[0].returncode == 4, out[-3000:]
    assert "rank 1" in out and "train.resume=auto" in out


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_runs_unchanged_under_launchers(workdir, launcher):
    args = train_args(workdir, f"via-{launcher}", "train.max_steps=3", "train.export=false")[
        3:
    ]  # drop "python -m scale_hyper"
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "scale_hyper", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "scale_hyper", *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "world 2" in proc.stdout and "training finished" in proc.stdout


def test_non_finite_losses_are_skipped_then_stop_with_checkpoint(workdir):
    proc = run_ranks(train_args(workdir, "nan", "train.max_steps=50", "train.lr=1e38", "train.grad_clip=0",
                                "train.warmup_ratio=0", "train.max_bad_steps=3"), 1, workdir)[0]  # fmt: skip
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "in a row had non-finite gradients" in proc.stdout
    assert list((workdir / "nan" / "checkpoints").glob("step_*/trainer_state.json"))
