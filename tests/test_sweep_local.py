"""`scale-hyper sweep SPEC --local` end to end: real trainings, one after another, in this process's
environment (the runner `sweeps/cpu-study.yaml` uses for docs/results.md).

A 2-run grid (hyperbert/bert, one seed, a few steps, eval follow-up with per-batch losses):

1. the first invocation is stopped (SIGTERM to the sweep's process group, as Ctrl-C or a wrapper's
   `timeout` would do) while the first run trains: that run keeps a checkpoint and is "interrupted";
2. the second invocation resumes it from the checkpoint, runs the other, the evals and the report;
3. a third invocation runs nothing and leaves the state as it was.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_slurm import DATA, shards  # noqa: F401  (one prepared shard set, reused)

REPO = Path(__file__).resolve().parents[1]
STEPS = 30

SPEC = """
name: loc
output: {out}
common:
{data}
  data.output: {shards}
  train.global_batch_size: 8
  train.micro_batch_size: 8
  train.log_every: 1
  train.eval_every: 10
  train.eval_batches: 2
  train.save_every: 1000
  train.stop_check_every: 1
  train.lr: 3.0e-3
  train.export: true
  deepspeed.precision: fp32
  tracking.uri: sqlite:///{tmp}/mlflow.db
budget:
  steps: {steps}
axes:
  preset: [hyperbert-tiny, bert-tiny]
  train.seed: [1]
follow_ups:
  eval: {{batches: 3}}
"""


def sweep(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **kw}
    return subprocess.Popen([sys.executable, "-m", "scale_hyper", "sweep", str(tmp_path / "spec.yaml"), "--local", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_local_sweep_stopped_resumes_then_has_nothing_to_do(shards, tmp_path):  # noqa: F811
    data = "\n".join(f"  {kv.replace('=', ': ')}" for kv in DATA)
    (tmp_path / "spec.yaml").write_text(SPEC.format(out=tmp_path / "out", data=data, shards=shards, tmp=tmp_path,
                                                    steps=STEPS))  # fmt: skip
    out_dir = tmp_path / "out"
    first_log = out_dir / "logs" / "hyperbert-tiny_s1.train.log"

    # 1. Stop the sweep while its first run trains (slowed so the stop lands mid-run).
    proc = sweep(tmp_path, SCALE_HYPER_TEST_STEP_SECONDS="0.3")
    deadline = time.monotonic() + 300
    while not (first_log.exists() and re.search(r"\[scale-hyper\] step [3-9]/", first_log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:] if proc.stdout else ""
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # the sweep and the training it runs (one process group)
    proc.communicate(timeout=300)
    deadline = time.monotonic() + 120  # the training outlives the sweep by its checkpoint write: wait for it
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, first_log.read_text()[-4000:]
        time.sleep(0.5)
    k = int(re.search(r"checkpoint saved at step (\d+)", first_log.read_text()).group(1))
    assert 0 < k < STEPS

    # 2. Run again: the stopped run resumes from its checkpoint; the rest runs; the report is written.
    out = finish(sweep(tmp_path))
    assert "hyperbert-tiny_s1: resuming from its newest checkpoint" in out, out[-4000:]
    assert re.search(rf"resumed from \S+step_{k} at step {k}\b", first_log.read_text())
    assert "0 failed" in out and (out_dir / "eval" / "bert-tiny_s1.json").exists()
    report = (out_dir / "report" / "report.md").read_text()
    assert "2 of 2 runs finished" in report, report
    assert re.search(r"\| bert \| [+-]\d\.\d{4} \| .* over \d+ batches", report), report
    assert "Clock spread not measured (one run per mixer)" in report  # the clock check, on real runs
    state = json.loads((out_dir / "sweep-state.json").read_text())

    # 3. Everything finished: nothing runs, the state is unchanged.
    out = finish(sweep(tmp_path))
    assert "[sweep] loc: 0 step(s) run, 0 failed, 4 already finished" in out, out[-4000:]
    assert json.loads((out_dir / "sweep-state.json").read_text())["runs"] == state["runs"]
