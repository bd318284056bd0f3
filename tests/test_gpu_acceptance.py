"""`.ci/gpu` (the GPU acceptance command) on a machine without a GPU: every GPU step is SKIPPED
with its reason, what runs on a CPU (the environment, the compiler's report scaled down to the
widest tiles) still runs, and the JSON and markdown reports are written. On a GPU the same command
runs everything (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import need_module, unavailable

REPO = Path(__file__).resolve().parent.parent


def test_cpu_path_skips_every_gpu_step_with_its_reason(tmp_path):
    if torch.cuda.is_available():
        unavailable("a CUDA device is visible: .ci/gpu runs its GPU steps here; this test is for the CPU path")
    need_module("triton")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "gpu"), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-acceptance.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "kernel-tests", "compile-report", "graph-breaks", "prepare", "doctor",
                           "bench-train", "train-bf16", "save-export-eval", "bf16-vs-fp32"]  # fmt: skip
    ran = {"environment", "compile-report"}
    for name, step in steps.items():
        if name in ran:
            assert step["status"] == "PASS", step
        else:
            assert (
                step["status"] == "SKIPPED"
                and step["detail"].startswith("no CUDA device: ")
                and len(step["detail"]) > 30
            )
    assert report["meta"]["device"] == "no GPU" and steps["environment"]["data"]["torch"] == torch.__version__
    compiled = json.loads((tmp_path / "out" / "compile_report.json").read_text())
    assert len(compiled) == 6 and all(
        r["arch"] == 90 and r["p"] == r["c"] == 128 and not r["problem"] for r in compiled
    )
    assert "scaled down" in steps["compile-report"]["detail"]
    table = (tmp_path / "out" / "gpu-acceptance.md").read_text()
    assert table.count("| SKIPPED |") == 8 and "| compile-report | PASS | 6 kernels, 0 with problems |" in table
    assert (tmp_path / "out" / "logs" / "compile-report.log").read_text().startswith("$ ")
    bad = subprocess.run([sys.executable, str(REPO / ".ci" / "gpu"), str(tmp_path / "x"), "--only", "nope"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown step(s) ['nope']" in bad.stderr
