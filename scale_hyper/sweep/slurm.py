"""`scale-hyper sweep SPEC --slurm`: submit what is not finished, as a chain of dependent jobs.

Training goes through the project's own sbatch template (``slurm.template``, default
``slurm/single-node.sbatch``), unchanged, so its contract holds: ``--signal=B:USR1@120`` or a stop
request → checkpoint → ``scontrol requeue`` → resume under the same job id, decided on the evidence of
a new complete checkpoint. The run's name, run directory (``OUT/runs/NAME``) and MLflow names reach
the template through its edit-block variables (``RUN_NAME``, ``RUNS_DIR``, ``CONFIG``,
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT``) in sbatch's exported environment; the run's overrides
are the template's arguments. Follow-ups are small generated scripts (``OUT/jobs/``): data
preparation before the first training job, transplant after its source, eval/GLUE after their run
(``afterok``, ``--kill-on-invalid-dep=yes`` so a failed run's follow-ups leave the queue instead of
pending forever), and one report job after everything (``afterany``). A requeued training job keeps
its id, so its dependants wait for the resumed run. Job ids go to the state file at once.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from scale_hyper.sweep import commands
from scale_hyper.sweep.expand import Run
from scale_hyper.sweep.spec import Spec, SweepError
from scale_hyper.sweep.state import ALIVE, Paths, last_attempt, record, step_done, steps_of, write_state


class Submitter:
    def __init__(self, spec: Spec, paths: Paths, state: Dict, jobs: Dict[str, str], extra: Sequence[str]):
        self.spec, self.paths, self.state, self.jobs, self.extra = spec, paths, state, jobs, list(extra)
        self.template = Path(str(spec.slurm.get("template", "slurm/single-node.sbatch")))
        if not self.template.is_file():
            raise SweepError(f"{spec.path}: slurm.template {self.template} not found (relative to {Path.cwd()}) — "
                             "run the sweep from the repository root, or give the template's path")  # fmt: skip
        self.submitted: List[str] = []
        self.out_abs = paths.out.resolve()

    # -- sbatch -------------------------------------------------------------------------------------
    def _sbatch(self, name: str, options: List[str], script: Path, args: List[str], after: List[str],
                kind: str, env: Optional[Dict[str, str]] = None) -> str:  # fmt: skip
        (self.out_abs / "logs").mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--job-name={self.spec.name}.{name}",
               f"--output={self.out_abs}/logs/%x-%j.out", f"--chdir={Path.cwd()}", *options]  # fmt: skip
        if after:
            cmd += [f"--dependency={kind}:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        cmd += [str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
        if proc.returncode != 0:
            raise SweepError(f"sbatch refused {name}: {proc.stderr.strip() or proc.stdout.strip()} — "
                             "fix slurm.sbatch / slurm.followup_sbatch in the spec (partition, time, GPUs)")  # fmt: skip
        job = proc.stdout.strip().split(";")[0]
        self.submitted.append(job)
        print(f"[sweep] submitted {name}: job {job}" + (f" ({kind} {','.join(after)})" if after else ""), flush=True)
        return job

    def _script(self, name: str, argv: List[str]) -> Path:
        self.paths.jobs.mkdir(parents=True, exist_ok=True)
        path = self.out_abs / "jobs" / f"{name}.sh"
        path.write_text("#!/bin/bash\n"
                        f"# scale-hyper sweep {self.spec.name}: {name} (generated; `scale-hyper sweep` resubmits it)\n"
                        "set -euo pipefail\n" + shlex.join(argv) + "\n")  # fmt: skip
        path.chmod(0o755)
        return path

    def follow_up(self, name: str, argv: List[str], after: List[str], kind: str = "afterok") -> str:
        options = [str(o) for o in self.spec.slurm.get("followup_sbatch", [])]
        return self._sbatch(name, options, self._script(name, argv), [], after, kind)

    # -- what a step waits for ------------------------------------------------------------------------
    def pending_job(self, run: str, step: str) -> Optional[str]:
        """The job id of this step when it is queued or running (submitted now or earlier)."""
        last = last_attempt(self.state, run, step)
        job = str(last["job"]) if last and last.get("job") else None
        if job and (job in self.submitted or self.jobs.get(job) in ALIVE):
            return job
        return None

    def _record(self, run: str, step: str, job: str) -> None:
        record(self.state, run, step, backend="slurm", job=job)
        write_state(self.paths, self.state)

    # -- the sweep ------------------------------------------------------------------------------------
    def prepare_data(self, runs: List[Run]) -> List[str]:
        """One preparation job per distinct data.output that has no shards yet; training waits for it."""
        from scale_hyper.data import load_manifest

        jobs, seen = [], set()
        for run in runs:
            out = run.run.data.output
            if out in seen or run.kind != "train":
                continue
            seen.add(out)
            if load_manifest(out, run.run.data.allow_pipe) is not None:
                continue
            name = f"prepare-{len(seen)}"
            job = self.pending_job(name, "prepare") or self.follow_up(
                name, [*commands.PY, "prepare", *run.configs, *run.overrides, *self.extra], []
            )
            self._record(name, "prepare", job)
            jobs.append(job)
        return jobs

    def submit(self, runs: List[Run], parent: Optional[str]) -> List[str]:
        prep = self.prepare_data(runs)
        train_sbatch = [str(o) for o in self.spec.slurm.get("sbatch", [])]
        by_name = {r.name: r for r in runs}
        for run in runs:
            for step in steps_of(run, self.spec.eval is not None, self.spec.glue is not None):
                if step_done(self.paths, run, step) or self.pending_job(run.name, step):
                    continue
                after = list(prep) if step in ("train", "transplant") else []
                if step == "transplant" or (step == "train" and run.kind == "continued"):
                    src = by_name[run.source or ""]
                    if not step_done(self.paths, src, "train"):
                        after.append(self.pending_job(src.name, "train") or "")
                if step == "train" and run.kind == "transplant":
                    after.append(self.pending_job(run.name, "transplant") or "")
                if step in ("eval", "glue"):
                    after.append(self.pending_job(run.name, "train") or "")
                if "" in after:  # what it needs neither finished nor is queued (failed): next invocation
                    print(f"[sweep] {run.name}: {step} waits for a step that failed; not submitted")
                    continue
                after = [a for a in after if a]
                if step == "train":
                    job = self._sbatch(run.name, train_sbatch, self.template,
                                       commands.train_args(self.spec, self.paths, run, parent, self.extra),
                                       after, "afterok", self._train_env(run))  # fmt: skip
                else:
                    job = self.follow_up(f"{run.name}.{step}", commands.step_args(self.spec, self.paths, run, step),
                                         after)  # fmt: skip
                self._record(run.name, step, job)
        if self.submitted:
            job = self.follow_up("report", [*commands.report_args(self.spec), *self.extra],
                                 sorted(set(self.submitted), key=int), "afterany")  # fmt: skip
            record(self.state, "_report", "report", backend="slurm", job=job)
            write_state(self.paths, self.state)
        return self.submitted

    def _train_env(self, run: Run) -> Dict[str, str]:
        env = {"CONFIG": " ".join(run.configs), "RUN_NAME": run.name, "RUNS_DIR": str(self.out_abs / "runs"),
               "MLFLOW_TRACKING_URI": run.run.tracking.uri, "MLFLOW_EXPERIMENT": commands.experiment(self.spec),
               "DATA_DIR": ""}  # fmt: skip
        env.update({str(k): str(v) for k, v in (self.spec.slurm.get("env") or {}).items()})
        return env
