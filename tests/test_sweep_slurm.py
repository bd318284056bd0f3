"""`scale-hyper sweep --slurm` on the real test SLURM cluster (tests/test_slurm.py's `cluster` fixture).

One 2 × 2 tiny grid (hyperbert/bert × 2 seeds, 20 steps, eval follow-up with per-batch losses), run
through the shipped slurm/single-node.sbatch exactly as a user's sweep would be:

1. the sweep submits 4 training jobs, 4 eval jobs (afterok) and a report job (afterany);
2. one training job gets `scancel --signal=USR1 --batch` mid-run (what SLURM sends before the time
   limit): it checkpoints, is requeued under the same id and resumes; its eval waits for the resumed
   run; another training job is cancelled for good (plain scancel: no requeue), its eval leaves the
   queue (--kill-on-invalid-dep) and the report job still runs;
3. re-running the sweep resubmits only the cancelled run (its training, its eval, a report);
4. the report has the seed statistics and the paired test; the runs are nested under the sweep's
   MLflow parent run;
5. re-running once everything finished submits nothing.

The test SLURM has no accounting (no sacct): the sweep reads squeue and the run directories.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from test_slurm import DATA, TERMINAL, Job, cluster, shards  # noqa: F401  (fixtures reused)

REPO = Path(__file__).resolve().parents[1]
STEPS = 40

SPEC = """
name: sw
output: {out}
common:
{data}
  data.output: {shards}
  train.global_batch_size: 8
  train.micro_batch_size: 8
  train.log_every: 1
  train.eval_every: 5
  train.eval_batches: 2
  train.save_every: 1000
  train.stop_check_every: 1
  train.lr: 3.0e-3
  deepspeed.precision: fp32
  tracking.uri: sqlite:///{tmp}/mlflow.db
budget:
  steps: {steps}
axes:
  preset: [hyperbert-tiny, bert-tiny]
  train.seed: [1, 2]
follow_ups:
  eval: {{batches: 3}}
slurm:
  template: {repo}/slurm/single-node.sbatch
  sbatch: [--partition={part}, --gpus-per-node=0, --nodes=1, --ntasks-per-node=1, --cpus-per-task=1, --time=10]
  followup_sbatch: [--partition={part}, --ntasks=1, --cpus-per-task=1, --time=10]
  env: {{PREFLIGHT: "0", OMP_NUM_THREADS: "1", SCALE_HYPER_TEST_STEP_SECONDS: "0.25"}}
"""


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scale_hyper", "sweep", str(tmp_path / "spec.yaml"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "sweep-state.json").read_text())


def jobs_of(st: dict, step: str) -> dict:
    return {run: [str(a["job"]) for a in s[step]["attempts"]] for run, s in st["runs"].items() if step in s}


def job(tmp_path: Path, run: str, job_id: str) -> Job:
    return Job(job_id, tmp_path / "out" / "logs" / f"sw.{run}-{job_id}.out")


def wait_all(ids: List[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    left = list(ids)
    while left and time.monotonic() < deadline:
        left = [i for i in left if Job(i, Path("/nonexistent")).info().get("JobState") not in TERMINAL]
        time.sleep(2)
    assert not left, f"jobs still queued after {timeout:.0f}s: {left}"


@pytest.mark.slow
def test_sweep_on_slurm_requeues_resumes_resubmits_only_the_failed_run_and_reports(cluster, shards, tmp_path):  # noqa: F811
    started = time.monotonic()
    data = "\n".join(f"  {kv.replace('=', ': ')}" for kv in DATA)
    (tmp_path / "spec.yaml").write_text(SPEC.format(out=tmp_path / "out", data=data, shards=shards, tmp=tmp_path,
                                                    steps=STEPS, repo=REPO, part=cluster["partition"]))  # fmt: skip
    submitted: List[str] = []
    try:
        out = sweep(tmp_path, "--slurm").stdout
        st = state(tmp_path)
        trains, evals = jobs_of(st, "train"), jobs_of(st, "eval")
        assert set(trains) == {"hyperbert-tiny_s1", "hyperbert-tiny_s2", "bert-tiny_s1", "bert-tiny_s2"}, out
        assert set(evals) == set(trains) and len(jobs_of(st, "report")["_report"]) == 1
        submitted += [j for js in (*trains.values(), *evals.values()) for j in js] + jobs_of(st, "report")["_report"]

        # One training job dies for good as soon as it trains: SIGKILL to its batch shell (a crash of the
        # job's own script, as the OOM killer would do); the job ends and nothing requeues it. (A plain
        # scancel would not do: the template's TERM trap checkpoints first, so the run is merely interrupted.)
        dead = job(tmp_path, "bert-tiny_s2", trains["bert-tiny_s2"][0])
        dead.wait_for(r"\[scale-hyper\] step \d+/", timeout=240)
        assert subprocess.run(["scancel", "--batch", "--signal=KILL", dead.id]).returncode == 0
        # Another asked to stop mid-run (what SLURM sends before the time limit): checkpoint, requeue, resume.
        pre = job(tmp_path, "hyperbert-tiny_s1", trains["hyperbert-tiny_s1"][0])
        pre.wait_for(r"\[scale-hyper\] step \d+/", timeout=240)
        assert subprocess.run(["scancel", "--signal=USR1", "--batch", pre.id]).returncode == 0
        wait_all(submitted, 300)

        info, text = pre.info(), pre.text()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-6000:]
        k = int(re.search(r"checkpoint saved at step (\d+)", text).group(1))
        assert "requeueing job" in text and re.search(rf"resumed from \S+step_{k} at step {k}\b", text), text[-6000:]
        # its eval waited for the resumed run (afterok holds across the requeue)
        marker = (
            tmp_path / "out" / "runs" / "hyperbert-tiny_s1" / "checkpoints" / f"step_{STEPS}" / "trainer_state.json"
        )
        per_batch = tmp_path / "out" / "eval" / "hyperbert-tiny_s1.json"
        assert per_batch.stat().st_mtime > marker.stat().st_mtime
        doc = json.loads(per_batch.read_text())  # eval --per-batch: the batches add up to the reported loss
        total = sum(b["loss_sum"] for b in doc["batches"]) / sum(b["masked_tokens"] for b in doc["batches"])
        assert len(doc["batches"]) == 3 and abs(total - doc["metrics"]["val_loss"]) < 1e-9
        assert dead.info()["JobState"] in ("FAILED", "CANCELLED") and dead.info()["Restarts"] == "0", dead.text()[
            -3000:
        ]
        assert not (tmp_path / "out" / "eval" / "bert-tiny_s2.json").exists()

        status = sweep(tmp_path, "--status").stdout
        assert re.search(r"bert-tiny_s2\s+train: (failed|interrupted)\s+eval: failed", status), status
        assert status.count("train: finished") == 3, status

        # Re-running resubmits only the failed run: its training, its eval, and a report.
        out = sweep(tmp_path, "--slurm").stdout
        st2 = state(tmp_path)
        new = {run: ids[len(trains.get(run, [])) :] for run, ids in jobs_of(st2, "train").items()}
        assert {run: len(ids) for run, ids in new.items() if ids} == {"bert-tiny_s2": 1}, out
        assert len(jobs_of(st2, "eval")["bert-tiny_s2"]) == 2 and out.count("submitted ") == 3, out
        again = [
            new["bert-tiny_s2"][0],
            jobs_of(st2, "eval")["bert-tiny_s2"][-1],
            jobs_of(st2, "report")["_report"][-1],
        ]
        submitted += again
        wait_all(again, 240)

        report = (tmp_path / "out" / "report" / "report.md").read_text()
        assert "4 of 4 runs finished" in report, report
        assert re.search(
            r"\| hyperbert \| 0\.003 \| 2 \| \d\.\d{4} ± \d\.\d{4} \| \d\.\d{4}–\d\.\d{4} \| \*\*selected", report
        )
        assert re.search(r"\| bert \| 0\.003 \| 2 \| \d\.\d{4} ± \d\.\d{4} \|", report), report
        assert "2 seeds: the seed statistics below are descriptive only" in report
        assert re.search(r"\| bert \| [+-]\d\.\d{4} \| \d\.\d{4} \| .* over \d+ batches", report), report

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("sw")
        children = [r for r in client.search_runs([exp.experiment_id]) if "sweep_run" in r.data.tags]
        assert len({r.data.tags["sweep_run"] for r in children}) == 4
        assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {st2["parent_run_id"]}

        # Everything finished: re-running submits nothing.
        before = subprocess.run(["squeue", "-h", "-a", "-o", "%i"], capture_output=True, text=True).stdout.split()
        out = sweep(tmp_path, "--slurm").stdout
        assert "nothing to submit" in out and "submitted " not in out
        after = subprocess.run(["squeue", "-h", "-a", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert sorted(after) == sorted(before) and state(tmp_path)["runs"] == st2["runs"]
    finally:
        for j in submitted:  # never leave a job behind
            if Job(j, Path("/nonexistent")).info().get("JobState") not in TERMINAL:
                subprocess.run(["scancel", j])
        print(f"sweep SLURM test wall time: {time.monotonic() - started:.0f} s", file=sys.stderr)
