"""`scale-hyper train` end to end: real DeepSpeed on CPU ranks over gloo, real shards, a real
MLflow sqlite store. Each test drives the CLI the way a user (or srun/torchrun) would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import prepare_shards, run_ranks, scale_hyper, start_ranks

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


# The straight 2-rank run and the first half of the same run (stopped after 4 steps): fixtures, so that each test
# below resumes a copy of its own and none depends on another having run. ZeRO-2, global batch 16 = micro 8 × 2 ranks.
RUN8 = ("train.max_steps=8", "deepspeed.zero_stage=2", "train.global_batch_size=16")


@pytest.fixture(scope="module")
def straight(workdir) -> Path:
    out = ok(run_ranks(train_args(workdir, "straight", *RUN8), 2, workdir))
    assert "training finished" in out
    return workdir / "straight"


@pytest.fixture(scope="module")
def half(workdir) -> Path:
    first = ok(run_ranks(train_args(workdir, "half", *RUN8, "train.stop_after_steps=4"), 2, workdir))
    assert "checkpoint saved" in first and "training finished" not in first
    return workdir / "half"


def resume_copy(half: Path, name: str) -> Path:
    """A copy of the stopped run directory (checkpoint step_4, metrics.jsonl, the MLflow run id) to resume."""
    out = half.parent / name
    shutil.copytree(half, out)
    return out


def assert_continued(resumed: dict, straight: dict) -> None:
    """Steps 5–8 of a run resumed with another layout (micro batch or world size): the sample order after
    the re-split is not the straight run's (docs/engine.md, "Batch semantics"), so the losses are
    equivalent, not equal — but their mean is the straight run's 5–8 mean, not the level of steps 1–4 that
    a restart from scratch would give (straight: ~0.15 apart over 4 steps here)."""
    start = sum(straight[s] for s in range(1, 5)) / 4
    later = sum(straight[s] for s in range(5, 9)) / 4
    got = sum(resumed[s] for s in range(5, 9)) / 4
    assert start - later > 0.05, straight  # the straight run learns: the two levels can be told apart
    assert abs(got - later) < (start - later) / 3, {"resumed 5-8": got, "straight 5-8": later, "straight 1-4": start}


@pytest.fixture(scope="module")
def resumed(workdir, half) -> Path:
    out = resume_copy(half, "resumed")
    second = ok(run_ranks(train_args(workdir, "resumed", *RUN8), 2, workdir))
    assert "resumed from" in second and "step_4" in second
    return out


def test_resume_is_bit_exact_on_two_ranks(straight, resumed):
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # no step lost or repeated
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-identical
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # and so are the weights


def metrics(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_resume_with_another_micro_batch_keeps_global_batch_schedule_and_data(workdir, straight, half):
    """The global batch is the invariant (issue 12): the first half, resumed with micro 4 × accumulation 2,
    keeps the global batch, the LR schedule and the data position; a resume whose recipe contradicts the
    checkpoint fails before any work and leaves the run directory as it was."""
    out = resume_copy(half, "micro")
    off = "tracking.enabled=false"  # the copy's MLflow run is the resumed test's
    resumed = ok(run_ranks(train_args(workdir, "micro", *RUN8, "train.micro_batch_size=4", off), 2, workdir))
    assert "resumed from" in resumed and "micro 4 × accumulation 2 × world 2" in resumed
    assert "none read twice" in resumed  # the data cursor was re-split at sample granularity
    a, b = metrics(straight), metrics(out)
    assert sorted(b) == list(range(1, 9))
    assert [b[s]["lr"] for s in range(1, 9)] == pytest.approx([a[s]["lr"] for s in range(1, 9)], rel=1e-6)
    assert [b[s]["tokens_seen"] for s in range(1, 9)] == [a[s]["tokens_seen"] for s in range(1, 9)]
    assert [b[s]["loss"] for s in range(1, 5)] == [a[s]["loss"] for s in range(1, 5)]  # the same first half
    assert_continued({s: b[s]["loss"] for s in b}, {s: a[s]["loss"] for s in a})

    # A resume whose recipe contradicts the checkpoint: refused before any work, the run directory untouched.
    before = snapshot(out)
    for bad, key in (
        ("train.global_batch_size=32", "train.global_batch_size=16"),
        ("data.seq_len=32", "data.seq_len=64"),
    ):
        procs = run_ranks(train_args(workdir, "micro", *RUN8, "train.max_steps=12", off, bad), 2, workdir)
        for p in procs:
            assert p.returncode == 2, p.stdout[-3000:]
        err = procs[0].stdout
        assert f"scale-hyper: error: checkpoint {out}" in err and f"set {key} to continue it" in err
        assert "prepare" not in err and "world 2 (rank" not in err  # no data preparation, no engine
        assert snapshot(out) == before


def final_weights(run_dir: Path) -> dict:
    from scale_hyper import runs

    return runs.consolidated_state_dict(runs.RunDir(run_dir).step(8))


def test_mlflow_run_continues_and_holds_what_was_promised(workdir, resumed):
    from mlflow import MlflowClient

    state = json.loads((resumed / "checkpoints" / "step_8" / "trainer_state.json").read_text())
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


def test_export_loads_with_auto_class_and_fills_masks(straight):
    hf = straight / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    code = (
        "import json\n"
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline\n"
        f"m = AutoModelForMaskedLM.from_pretrained(r'{hf}', trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained(r'{hf}')\n"
        "text = f'the {t.mask_token} of the module'\n"
        "out = pipeline('fill-mask', model=m, tokenizer=t)(text)\n"
        "print('FILLED', json.dumps({'ids': t(text)['input_ids'], 'mask': t.mask_token_id,\n"
        "                            'top': [[o['token'], o['score']] for o in out]}))\n"
    )
    # Run from an empty directory without the repo on the path: the custom code must travel with the model.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=straight, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "FILLED" in proc.stdout, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("FILLED", 1)[1])
    # The pipeline's top 5 are the trained model's: the checkpoint's weights, loaded here by scale_hyper.
    from scale_hyper import runs

    model = runs.load_mlm(runs.resolve(straight / "checkpoints" / "step_8"))
    ids = torch.tensor([got["ids"]])
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, got["ids"].index(got["mask"])].softmax(-1)
    top = probs.topk(5)
    assert [t for t, _ in got["top"]] == top.indices.tolist()
    assert [p for _, p in got["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def load_weights(out: Path) -> dict:
    """The state dict zero_to_fp32.py wrote into ``out`` (safetensors or pickle, one file or shards)."""
    tensors: dict = {}
    for f in sorted(out.iterdir()):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors.update(load_file(f))
        elif f.suffix == ".bin":
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    return tensors


def test_zero_to_fp32_inside_checkpoint_works(straight):
    ckpt = straight / "checkpoints" / "step_8"
    script = ckpt.parent / "zero_to_fp32.py"
    if not script.exists():
        script = ckpt / "zero_to_fp32.py"
    out = straight.parent / "fp32"
    proc = subprocess.run([sys.executable, str(script), str(ckpt.parent), str(out), "--tag", "step_8"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_weights(out)
    # The reference: the module's own fp32 weights in the checkpoint's model-states file (ZeRO-2 in fp32
    # keeps full weights there), not a reconstruction from the optimizer's partitions as the script does.
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    params = {k: v for k, v in module.items() if not k.endswith("position_ids")}
    assert got.keys() == params.keys(), sorted(set(got) ^ set(params))
    assert all(torch.equal(got[k], params[k]) for k in params)


def test_resume_at_other_world_size_needs_universal_then_works(workdir, straight):
    """Saved by 2 ranks (ZeRO-3), refused at 1 rank, converted, resumed at 1 rank with accumulation 2."""
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
    # What the 1-rank run reloads is what the 2 ranks saved: every weight of the universal copy is the
    # consolidated step_4, bit for bit.
    from scale_hyper import runs

    saved = runs.consolidated_state_dict(ckpt)
    universal = ckpt.with_name("step_4_universal") / "zero"
    for name, tensor in saved.items():
        reloaded = torch.load(universal / name / "fp32.pt", map_location="cpu", weights_only=False)
        reloaded = reloaded["param"] if isinstance(reloaded, dict) else reloaded  # ds_to_universal writes either
        assert torch.equal(reloaded.view_as(tensor), tensor), name
    resumed = ok(run_ranks(train_args(workdir, "uni", "train.max_steps=8", "deepspeed.zero_stage=3", g16), 1, workdir))
    assert "step_4_universal" in resumed and "training finished" in resumed
    assert "micro 8 × accumulation 2 × world 1" in resumed and "none read twice" in resumed
    steps, ref = losses(workdir / "uni"), losses(straight)
    assert sorted(steps) == list(range(1, 9))
    # Steps 1-4: ZeRO-3 on 2 ranks trains as the straight ZeRO-2 run does (same data, same batches).
    assert [steps[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=1e-4)
    assert_continued(steps, ref)  # continued training, not a restart from scratch


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


def test_non_finite_losses_are_skipped_then_stop_with_checkpoint(workdir):
    """A real overflow (lr 1e38: the weights go to inf after the first update), not an injected NaN:
    the refused steps are counted on both ranks, then both stop with a checkpoint and exit 3."""
    procs = run_ranks(train_args(workdir, "nan", "train.max_steps=50", "train.lr=1e38", "train.grad_clip=0",
                                 "train.warmup_ratio=0", "train.max_bad_steps=3"), 2, workdir)  # fmt: skip
    assert [p.returncode for p in procs] == [3, 3], procs[0].stdout[-4000:]
    m = re.search(
        r"(\d+) optimizer steps in a row had non-finite gradients \(step (\d+)\); checkpoint saved", procs[0].stdout
    )
    assert m and int(m.group(1)) == 3, procs[0].stdout[-4000:]  # train.max_bad_steps
    step = int(m.group(2))
    state = json.loads((workdir / "nan" / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
    assert state["step"] == step and state["bad_in_row"] == 3 and state["skipped"] >= 3
