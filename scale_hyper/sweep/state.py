"""Where each run of a sweep stands, from the run directories and the sweep's own state file.

A training run is **finished** when its newest complete checkpoint is at ``train.max_steps`` and its
Hugging Face export exists (the last thing training writes; with ``train.export=false``, the
checkpoint alone); **running** / **pending** while a job the sweep submitted for it is in ``squeue``;
**interrupted** when it has a complete checkpoint short of the end and nothing runs it (resubmitted:
``train.resume=auto`` continues from the checkpoint); **failed** when an attempt the state file
records ended without finishing and left no checkpoint; **never started** otherwise. A follow-up is
done when its output file exists. Nothing here asks ``sacct`` (clusters without accounting work too).

``OUT/sweep-state.json`` records the MLflow parent run and every attempt (job id or local exit
status, when); it is written atomically after each submission.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from scale_hyper import runs as layout
from scale_hyper.sweep.expand import Run

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}  # fmt: skip


class Paths:
    """Everything a sweep writes, under its output directory."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def eval_json(self, name: str) -> Path:
        return self.out / "eval" / f"{name}.json"

    def glue_dir(self, name: str) -> Path:
        return self.out / "glue" / name

    def transplant_dir(self, name: str) -> Path:
        return self.out / "transplant" / name

    @property
    def state(self) -> Path:
        return self.out / "sweep-state.json"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def jobs(self) -> Path:
        return self.out / "jobs"

    @property
    def report(self) -> Path:
        return self.out / "report"


def read_state(paths: Paths) -> Dict[str, Any]:
    try:
        return json.loads(paths.state.read_text())
    except FileNotFoundError:
        return {"runs": {}}


def write_state(paths: Paths, state: Dict[str, Any]) -> None:
    paths.out.mkdir(parents=True, exist_ok=True)
    tmp = paths.state.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, paths.state)


def record(state: Dict[str, Any], run: str, step: str, **attempt: Any) -> None:
    entry = state["runs"].setdefault(run, {}).setdefault(step, {"attempts": []})
    entry["attempts"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **attempt})


def last_attempt(state: Dict[str, Any], run: str, step: str) -> Optional[Dict[str, Any]]:
    attempts = state["runs"].get(run, {}).get(step, {}).get("attempts", [])
    return attempts[-1] if attempts else None


def alive_jobs() -> Optional[Dict[str, str]]:
    """Job id -> state of every job squeue knows (None: no SLURM here)."""
    if shutil.which("squeue") is None:
        return None
    proc = subprocess.run(["squeue", "-h", "-a", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)


def checkpoint_step(run_dir: Path) -> Optional[int]:
    newest = layout.RunDir(run_dir).newest()
    return int(layout.read_state(newest).get("step", 0)) if newest else None


def train_done(run: Run, run_dir: Path) -> bool:
    step = checkpoint_step(run_dir)
    if step is None or step < run.run.train.max_steps:
        return False
    export = layout.RunDir(run_dir).export
    return not run.run.train.export or (export / "config.json").is_file() and any(export.glob("tokenizer*"))


def step_done(paths: Paths, run: Run, step: str) -> bool:
    if step == "train":
        return train_done(run, paths.run_dir(run.name))
    if step == "eval":
        return paths.eval_json(run.name).is_file()
    if step == "glue":
        return (paths.glue_dir(run.name) / "results.json").is_file()
    if step == "transplant":
        return (paths.transplant_dir(f"{run.source}-L{run.layers}") / "config.json").is_file()
    raise ValueError(step)


def status(paths: Paths, state: Dict[str, Any], run: Run, step: str, jobs: Optional[Dict[str, str]]) -> str:
    """finished | running | pending | interrupted | failed | never started."""
    if step_done(paths, run, step):
        return "finished"
    last = last_attempt(state, run.name, step)
    job = str(last.get("job")) if last and last.get("job") else None
    if job and jobs is not None and jobs.get(job) in ALIVE:
        return "running" if jobs[job] in ("RUNNING", "COMPLETING") else "pending"
    if step == "train" and checkpoint_step(paths.run_dir(run.name)) is not None:
        return "interrupted"
    return "failed" if last else "never started"


def active(paths: Paths, state: Dict[str, Any], jobs: Optional[Dict[str, str]]) -> Set[str]:
    """Job ids of this sweep still in the queue."""
    if not jobs:
        return set()
    ids = {str(a.get("job")) for r in state["runs"].values() for s in r.values() for a in s.get("attempts", [])}
    ids |= {str(a.get("job")) for a in state.get("report", {}).get("attempts", [])}
    return {i for i in ids if jobs.get(i) in ALIVE}


def steps_of(run: Run, follow_eval: bool, follow_glue: bool) -> List[str]:
    steps = ["transplant"] if run.kind == "transplant" else []
    steps.append("train")
    if follow_eval:
        steps.append("eval")
    if follow_glue:
        steps.append("glue")
    return steps
