"""`scale-hyper doctor` on CPU ranks over gloo, launched as a user would (torchrun, plain processes
with RANK/WORLD_SIZE as srun's mapping gives them, one process), and each fault named.

Faults are real where they can be made here: a full disk (a small tmpfs), a rank that is never
launched, a read-only mount (tmpfs and mounts need root: outside CI those cases skip, under CI=true
they fail). Test hooks only for what one machine cannot produce: another DeepSpeed version on one
rank and a wrong kernel (SCALE_HYPER_TEST_DOCTOR_FAULTS, scale_hyper/doctor/results.py), and a
non-finite loss (the trainer's SCALE_HYPER_TEST_NONFINITE_STEPS). The residency and resume checks
are shown to FAIL on injected differences in their inputs (the trainers' metrics, cursors and probes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need_module, unavailable
from launch import free_port, prepare_shards, rank_env, run_ranks, scale_hyper

from scale_hyper.doctor.results import FAIL, PASS, Result, format_table

COMMON = [
    "data.max_documents=200", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.micro_batch_size=8", "train.global_batch_size=0", "deepspeed.precision=fp32",
    "train.lr=3e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return prepare_shards(tmp_path_factory.mktemp("doctor"), COMMON)


def doctor_args(wd: Path, name: str, *extra: str) -> list:
    """key=value overrides first, then the options (argparse takes no positionals after an option)."""
    first = next((i for i, a in enumerate(extra) if a.startswith("--")), len(extra))
    return ["doctor", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}", *extra[:first],
            "--json", str(wd / f"{name}.json"), *extra[first:]]  # fmt: skip


def report(wd: Path, name: str) -> dict:
    data = json.loads((wd / f"{name}.json").read_text())
    data["by_check"] = {r["check"]: r for r in data["results"]}
    return data


def two_ranks(wd: Path, name: str, *extra: str, env=None, timeout=600):
    procs = run_ranks(scale_hyper(*doctor_args(wd, name, *extra)), world=2, cwd=wd, timeout=timeout, extra_env=env)
    return procs


def one(wd: Path, args: list, env=None, timeout=300) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(key, None)
    return subprocess.run(scale_hyper(*args), cwd=wd, env=full, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before anything runs
# ---------------------------------------------------------------------------------------------------
def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("scale-hyper: error:")]
    assert len(lines) == 1 and " — " in lines[0], proc.stderr
    return lines[0]


def test_unknown_check_is_bad_input(tmp_path):
    line = one_error_line(one(tmp_path, ["doctor", "--checks", "environment,colectives"]))
    assert "'colectives'" in line and "collectives" in line.split("—")[1]


def test_world_size_the_batch_cannot_split(tmp_path):
    env = rank_env(0, 3, 29999)  # rank 0 of 3: the check comes before any rendezvous
    proc = subprocess.run(
        scale_hyper("doctor", "train.micro_batch_size=8", "train.global_batch_size=32"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = one_error_line(proc)
    assert "train.global_batch_size=32" in line and "3 ranks" in line


@pytest.fixture
def mount(tmp_path):
    """``mount(options)``: a fresh tmpfs at tmp_path/mnt (unmounted afterwards); needs root."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    point = tmp_path / "mnt"
    point.mkdir()

    def make(options: str) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        return point

    yield make
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_output_dir_on_a_full_disk(tmp_path, mount):
    """A real file system with 64 KiB: far too small for one checkpoint of the model."""
    disk = mount("size=64k")
    line = one_error_line(one(tmp_path, ["doctor", f"train.output_dir={disk}/run"]))
    assert "full disk" in line and f"{disk}/run" in line and "one checkpoint of this model needs about" in line


def test_table_wraps_details_under_their_column():
    rows = [Result("environment", PASS, "2 rank(s) alike", "word " * 40), Result("kernels", FAIL, "x", "short")]
    text = format_table(rows, width=80)
    lines = text.splitlines()
    assert lines[0].startswith("check") and "status" in lines[0] and "detail" in lines[0]
    assert lines[2].startswith("environment  PASS")
    column = lines[0].index("detail")
    assert all(line[:column].strip() == "" for line in lines[3:-1])  # continuation lines
    assert lines[-1].startswith("kernels") and "FAIL" in lines[-1]


# ---------------------------------------------------------------------------------------------------
# Whole doctor, 2 ranks (slow: real DeepSpeed training)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_rank_doctor_fp32_under_torchrun(workdir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "scale_hyper",
           *doctor_args(workdir, "fp32", "deepspeed.zero_stage=3")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert time.monotonic() - started < 240  # "about two minutes" (much less for this tiny model)
    out = proc.stdout
    assert "=== scale-hyper doctor: 2 rank(s)" in out and "doctor: PASS" in out
    assert out.count("check  ") == 1  # one table, printed by rank 0 only
    data = report(workdir, "fp32")
    checks = data["by_check"]
    for name in ("collectives/rendezvous", "environment", "collectives/all_reduce", "collectives/all_gather",
                 "sdpa", "storage/train.output_dir", "storage/data.output", "training", "training/residency",
                 "training/throughput", "resume"):  # fmt: skip
        assert checks[name]["status"] == "PASS", checks[name]
        assert checks[name]["check"] in out  # the same rows in the table
    assert checks["kernels"]["status"] == "SKIPPED" and "no CUDA device" in checks["kernels"]["detail"]
    assert "GB/s" in checks["collectives/all_reduce"]["figure"]
    assert checks["training/residency"]["figure"] == "0 gathers"
    throughput = checks["training/throughput"]  # the memory row: plan's figure beside the measured peak (issue 20)
    assert throughput["data"]["planned_memory_bytes"] > 0 and "; plan: " in throughput["detail"]
    assert "measured +" in throughput["detail"] and "Python, torch, DeepSpeed" in throughput["detail"]
    assert "bit-exact" in checks["resume"]["detail"] and checks["resume"]["figure"] == "equal"
    assert not (workdir / "fp32" / "doctor" / "a").exists()  # the short runs are removed


@pytest.mark.slow
def test_two_rank_doctor_bf16_plain_processes(workdir):
    """bf16 and ZeRO-2 through the checks that depend on them (the others ran in fp32 above)."""
    procs = two_ranks(workdir, "bf16", "deepspeed.precision=bf16", "deepspeed.zero_stage=2",
                      "--checks", "sdpa,training,resume", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    for p in procs:
        assert p.returncode == 0, p.stdout[-6000:]
    assert "doctor: PASS" in procs[0].stdout and "doctor:" not in procs[1].stdout
    checks = report(workdir, "bf16")["by_check"]
    assert checks["training"]["status"] == "PASS" and checks["resume"]["status"] == "PASS"
    assert checks["training/residency"]["status"] == "SKIPPED" and "ZeRO-2" in checks["training/residency"]["detail"]
    assert "bf16" in checks["sdpa"]["detail"]


# ---------------------------------------------------------------------------------------------------
# Injected faults, each named
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rank_that_never_joins_is_named_within_the_join_timeout(workdir):
    """Rank 0 of a 2-rank world, and rank 1 is never launched (a node that did not come up)."""
    started = time.monotonic()
    args = scale_hyper(*doctor_args(workdir, "absent", "--join-timeout", "5", "--checks", "environment"))
    proc = subprocess.run(args, cwd=workdir, env=rank_env(0, 2, free_port()), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert time.monotonic() - started < 60
    assert "rank 1 never joined the rendezvous" in proc.stdout
    row = report(workdir, "absent")["by_check"]["collectives/rendezvous"]
    assert row["status"] == "FAIL" and row["data"]["missing"] == [1] and row["figure"] == "1/2 joined"


@pytest.mark.slow
def test_version_mismatch_between_ranks_is_named(workdir):
    procs = two_ranks(workdir, "version", "--checks", "environment",
                      env={"SCALE_HYPER_TEST_DOCTOR_FAULTS": "version:1"})  # fmt: skip
    assert [p.returncode for p in procs] == [1, 1], procs[0].stdout[-4000:]
    row = report(workdir, "version")["by_check"]["environment"]
    assert row["status"] == "FAIL"
    assert "deepspeed differs between ranks (rank 0: " in row["detail"] and "rank 1: 0.19.8+injected" in row["detail"]


@pytest.mark.slow
def test_non_writable_output_dir_is_named(workdir, mount):
    """train.output_dir on a read-only mount (what root meets too: chmod would not stop root)."""
    ro = mount("size=16m")
    (ro / "readonly").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    args = doctor_args(workdir, "readonly", "--checks", "storage,training")
    args = [a.replace(f"train.output_dir={workdir}/readonly", f"train.output_dir={ro}/readonly") for a in args]
    procs = run_ranks(scale_hyper(*args), world=2, cwd=workdir, timeout=600)
    assert procs[0].returncode == 1, procs[0].stdout[-4000:]
    checks = report(workdir, "readonly")["by_check"]
    row = checks["storage/train.output_dir"]
    assert row["status"] == "FAIL" and f"train.output_dir={ro}/readonly is not writable" in row["detail"]
    assert "Read-only file system" in row["detail"]
    assert checks["storage/data.output"]["status"] == "PASS"
    assert checks["training"]["status"] == "SKIPPED" and "not writable" in checks["training"]["detail"]


@pytest.mark.slow
def test_non_finite_loss_is_named(workdir):
    procs = two_ranks(workdir, "nonfinite", "--checks", "training",
                      env={"SCALE_HYPER_TEST_NONFINITE_STEPS": "3,4", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert procs[0].returncode == 1, procs[0].stdout[-4000:]
    row = report(workdir, "nonfinite")["by_check"]["training"]
    assert row["status"] == "FAIL" and "non-finite loss: optimizer step(s) 3, 4" in row["detail"]


@pytest.mark.parametrize("fault", [False, True], ids=["agrees", "injected"])
def test_kernel_against_reference_in_the_interpreter(tmp_path, fault):
    """One plain process; without a GPU the kernel runs in Triton's CPU interpreter when asked."""
    need_module("triton")
    env = {"SCALE_HYPER_DOCTOR_INTERPRET": "1", **({"SCALE_HYPER_TEST_DOCTOR_FAULTS": "kernel"} if fault else {})}
    proc = one(tmp_path, ["doctor", "--checks", "kernels", "--json", str(tmp_path / "k.json")], env=env)
    assert proc.returncode == (1 if fault else 0), proc.stdout[-4000:] + proc.stderr[-4000:]
    row = report(tmp_path, "k")["by_check"]["kernels"]
    assert "Triton CPU interpreter" in row["detail"]
    if fault:
        assert (
            row["status"] == "FAIL" and "the Triton kernel disagrees with the torch reference: forward" in row["detail"]
        )
    else:
        assert row["status"] == "PASS"


def test_kernel_row_runs_the_models_geometry_on_both_reduction_paths():
    """On a GPU (its SM count given; nothing runs here) the kernel row checks the model's own d/H and
    d'/H at the trainer's micro-batch × seq_len with the SPLIT the kernel picks there, plus the other
    reduction path; an unsupported geometry falls back to 4 heads of 64."""
    from scale_hyper.config import load_config
    from scale_hyper.doctor.kernels import kernel_cases

    base = load_config(["hyperbert-base", "train.micro_batch_size=32", "data.seq_len=512"])
    training, other = kernel_cases(base, gpu_sms=132, supported=True)
    assert (training["b"], training["n"], training["heads"], training["c"], training["p"]) == (32, 512, 12, 64, 64)
    assert training["split"] == 1 and training["mask"]  # 384 programs >= 2 x 132 SMs: the in-kernel epilogue
    assert other["b"] == 2 and other["split"] >= 2 and other["n"] == 512  # the split-N partial sums
    short = load_config(["hyperbert-base", "train.micro_batch_size=8", "data.seq_len=8192", "model.max_position=8192"])
    training, other = kernel_cases(short, gpu_sms=132, supported=True)
    assert training["split"] == 3 and other["split"] == 1  # training splits: the single pass is the other
    odd, _ = kernel_cases(load_config(["hyperbert-base"]), gpu_sms=132, supported=False)
    assert (odd["heads"], odd["c"], odd["p"]) == (4, 64, 64)
    interpreted = kernel_cases(base, gpu_sms=None, supported=True)
    assert [c["split"] for c in interpreted] == [1, 2] and all(c["c"] == 16 for c in interpreted)


# ---------------------------------------------------------------------------------------------------
# The residency and resume checks can FAIL: their decisions on injected differences in what the two
# trainer runs (a: straight, b: resumed from a's half-way checkpoint) and their probes reported
# ---------------------------------------------------------------------------------------------------
def doctor_inputs(tmp_path: Path, b_losses=None, b_cursors=None) -> tuple:
    from scale_hyper.config import load_config
    from scale_hyper.doctor import training
    from scale_hyper.runs import manifest

    run = load_config([*COMMON, "deepspeed.zero_stage=3", f"train.output_dir={tmp_path}"])
    a = {s: 6.0 - 0.1 * s for s in range(1, 9)}
    b = {s: a[s] for s in range(5, 9)} if b_losses is None else b_losses
    cursors = [{"epoch": 0, "offset": 128}]
    for name, losses, cur in (("a", a, cursors), ("b", b, cursors if b_cursors is None else b_cursors)):
        home = training.doctor_dir(run) / name
        ckpt = home / "checkpoints" / "step_8"
        ckpt.mkdir(parents=True)
        rows = [{"step": s, "loss": v, "tokens_per_s": 1000.0, "skipped_steps": 0.0} for s, v in losses.items()]
        (home / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (ckpt / "weights.pt").write_bytes(b"the weights")  # a checkpoint as the trainer seals it: manifest + marker
        sealed = manifest.seal({"step": 8, "data_cursors": cur}, manifest.write(ckpt, [{}], 8, 1))
        (ckpt / "trainer_state.json").write_text(json.dumps(sealed))
    return run, training


def probe(rank: int, shared_gathers: int = 0, resident_at_end: bool = True) -> dict:
    """One rank's probe record as scale_hyper/doctor/probe.py writes it (gathers by optimizer step)."""
    return {"rank": rank, "exit": 0, "cause": "", "log": "", "probe": {
        "rank": rank, "zero_stage": 3, "shared_params": 10, "shared_numel": 1000, "optimizer_steps": 8, "layers": 2,
        "gathers": {"shared": {"1": 2, "4": shared_gathers}, "other": {"1": 5, "4": 5}},
        "resident_at_end": resident_at_end, "peak_memory_bytes": 1 << 20, "memory_kind": "RSS"}}  # fmt: skip


def test_residency_check_fails_when_the_hypernetwork_is_gathered(tmp_path):
    import torch

    run, training = doctor_inputs(tmp_path)
    cpu = torch.device("cpu")
    rows = {r.check: r for r in training.check_training(run, [probe(0), probe(1)], cpu, 2)}
    assert rows["training/residency"].status == PASS and rows["training/residency"].figure == "0 gathers"
    # Gathered in steady state on rank 1 (2 per step: once per layer), or not persistent at the end.
    for ranks in ([probe(0), probe(1, shared_gathers=2)], [probe(0), probe(1, resident_at_end=False)]):
        row = {r.check: r for r in training.check_training(run, ranks, cpu, 2)}["training/residency"]
        assert row.status == FAIL and "the hypernetwork is not resident" in row.detail


@pytest.mark.parametrize("fault", ["one loss", "cursors", "a step missing"])
def test_resume_check_fails_on_any_difference(tmp_path, fault):
    import torch

    straight = {s: 6.0 - 0.1 * s for s in range(5, 9)}
    b_losses = {**straight, 7: straight[7] * (1 + 1e-7)} if fault == "one loss" else None  # 1 ulp-ish away
    if fault == "a step missing":
        b_losses = {s: v for s, v in straight.items() if s != 6}
    b_cursors = [{"epoch": 0, "offset": 136}] if fault == "cursors" else None
    run, training = doctor_inputs(tmp_path, b_losses, b_cursors)
    ok = [{"rank": 0, "exit": 0}]
    row = training.check_resume(run, ok, 8, torch.device("cpu"))
    assert row.status == FAIL
    want = {"one loss": "differ from the uninterrupted run at step(s) [7]", "cursors": "data cursors at the end differ",
            "a step missing": "logged steps [5, 7, 8], expected [5, 6, 7, 8]"}[fault]  # fmt: skip
    assert want in row.detail, row.detail
    good, _ = doctor_inputs(tmp_path / "good")  # the same inputs, unchanged
    assert training.check_resume(good, ok, 8, torch.device("cpu")).status == PASS
