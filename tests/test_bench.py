"""`scale-hyper bench train`: the table and the MFU formula. (ZeRO-3 communication volume, resident vs
partitioned hypernetwork: tests/test_zero.py, from the same 2-rank launch as the other ZeRO checks.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from launch import REPO
from tiny_models import counted_flops

from scale_hyper.bench import train as bench
from scale_hyper.config import load_config
from scale_hyper.models import MIXERS


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        SCALE_HYPER_BENCH_SIZES="tiny", SCALE_HYPER_BENCH_SEQ="32", SCALE_HYPER_BENCH_TOKENS="128",
        SCALE_HYPER_BENCH_STEPS="2", SCALE_HYPER_BENCH_JSON=str(out),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "scale_hyper", "bench", "train", "train.device=cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _table_rows(stdout: str):
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:]]


def test_table_has_every_mixer_and_the_hf_row(cli_run):
    stdout, _ = cli_run
    rows = _table_rows(stdout)
    assert sorted(r["mixer"] for r in rows) == sorted([*MIXERS, bench.HF])
    for r in rows:
        assert (r["size"], r["seq_len"], r["batch"]) == ("tiny", "32", "4")
        assert float(r["tokens/s"].replace(",", "")) > 0, r
        assert r["MFU"] == "-"  # no known peak on a CPU
    hf = next(r for r in rows if r["mixer"] == bench.HF)
    assert hf["x HF"] == "1.00"


def test_json_matches_the_table(cli_run):
    stdout, data = cli_run
    assert data["meta"]["precision"] == "fp32" and data["meta"]["peak_flops"] is None
    by_mixer = {r["mixer"]: r for r in data["rows"]}
    assert set(by_mixer) == {*MIXERS, bench.HF}
    for r in by_mixer.values():
        assert r["status"] == "ok" and len(r["step_times_ms"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / (r["step_ms"] / 1e3))
        assert r["vs_hf"] == pytest.approx(r["tokens_per_s"] / by_mixer[bench.HF]["tokens_per_s"])


def test_mfu_is_counted_training_flops_over_peak():
    """MFU = training FLOPs per token × tokens/s ÷ peak, the FLOPs as torch's FlopCounterMode counts
    them on a real forward + backward (tests/tiny_models.py::counted_flops), not the formula itself."""
    mc = load_config(["hyperbert-tiny", "model.dropout=0.0"]).model
    batch, seq, masked = 2, 32, 8
    per_token = counted_flops(mc, batch, seq, masked)[1] / (batch * seq)
    fake_peak = 1e12
    got = bench.mfu(mc, seq, tokens_per_s=1e5, peak=fake_peak, mask_prob=masked / (batch * seq))
    assert got == pytest.approx(per_token * 1e5 / fake_peak, rel=1e-12)
    assert bench.mfu(mc, seq, 1e5, peak=None, mask_prob=0.15) is None


def test_run_bench_reports_mfu_when_the_peak_is_known(monkeypatch):
    # A fake peak for the CPU: the row's MFU must come from flops.train_flops_per_token.
    monkeypatch.setattr(bench, "peak_flops", lambda device, precision: 2e12)
    monkeypatch.setattr(bench, "train_flops_per_token", lambda mc, s, p: 1e6 * (2 if mc.mixer == "bert" else 1))
    run = load_config(["train.device=cpu"])
    plan = bench.Plan(["bert", "hypermixer"], ["tiny"], {"tiny": [16]}, tokens_per_step=32, steps=1, warmup=1)
    rows, meta = bench.run_bench(run, plan, log=lambda s: None)
    assert meta["peak_flops"] == 2e12
    for r in rows:
        factor = 2 if r.mixer in ("bert", bench.HF) else 1
        assert r.mfu == pytest.approx(factor * 1e6 * r.tokens_per_s / 2e12)
    assert "%" in bench.format_table(rows)


def test_oom_marks_the_row_and_skips_longer_sequences(monkeypatch):
    calls = []

    def fake_measure(build, batch, run, device, make_step, steps, warmup):
        calls.append(batch["input_ids"].shape[1])
        sparse = make_step.keywords["sparse"]
        if sparse and batch["input_ids"].shape[1] >= 32:  # ours OOMs from 32 on, HF (sparse=False) never
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return [0.01], None, "fake"

    monkeypatch.setattr(bench, "measure", fake_measure)
    plan = bench.Plan(["hyla"], ["tiny"], {"tiny": [16, 32, 64]}, tokens_per_step=64, steps=1, warmup=1)
    rows, _ = bench.run_bench(load_config(["train.device=cpu"]), plan, log=lambda s: None)
    hyla = [r.status for r in rows if r.mixer == "hyla"]
    assert hyla == ["ok", "OOM", "skipped"]
    assert calls.count(64) == 1  # only HF ran at 64


def test_plan_defaults_by_device_and_env_narrowing(monkeypatch):
    for k in ("MIXERS", "SIZES", "SEQ", "TOKENS", "STEPS"):
        monkeypatch.delenv(bench.ENV + k, raising=False)
    gpu = bench.make_plan(torch.device("cuda", 0))
    assert gpu.sizes == ["mini", "base"] and gpu.seq_lens["base"] == [128, 512, 2048, 8192]
    assert gpu.tokens_per_step == 65_536
    cpu = bench.make_plan(torch.device("cpu"))
    assert cpu.sizes == ["tiny", "mini"] and cpu.seq_lens == {"tiny": [128, 512], "mini": [128]}
    monkeypatch.setenv(bench.ENV + "MIXERS", "hyla,bert")
    monkeypatch.setenv(bench.ENV + "SEQ", "64")
    plan = bench.make_plan(torch.device("cpu"))
    assert plan.mixers == ["bert", "hyla"] and plan.seq_lens == {"tiny": [64], "mini": [64]}
    monkeypatch.setenv(bench.ENV + "MIXERS", "gpt")
    with pytest.raises(ValueError, match="gpt"):
        bench.make_plan(torch.device("cpu"))


def test_deepspeed_rows_run_the_trainers_engine(tmp_path):
    """SCALE_HYPER_BENCH_DEEPSPEED=1: a "+deepspeed" row runs the step `train` runs (DeepSpeed's
    engine as engine/setup.py builds it, here bf16 on the CPU) beside the plain-torch row."""
    out = tmp_path / "bench.json"
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SCALE_HYPER_BENCH_MIXERS="hyperbert",
        SCALE_HYPER_BENCH_SIZES="tiny", SCALE_HYPER_BENCH_SEQ="32", SCALE_HYPER_BENCH_TOKENS="128",
        SCALE_HYPER_BENCH_STEPS="2", SCALE_HYPER_BENCH_JSON=str(out), SCALE_HYPER_BENCH_DEEPSPEED="1",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "scale_hyper", "bench", "train", "train.device=cpu", "deepspeed.precision=bf16"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["mixer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"hyperbert", "hyperbert+deepspeed", bench.HF}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["hyperbert+deepspeed"]["step"].startswith("DeepSpeed ZeRO-1 bf16, AdamW")
    assert rows["hyperbert"]["step"].startswith("torch, fp32")
    assert "hyperbert+deepspeed" in proc.stdout
