"""`scale-hyper sweep SPEC --local`: every unfinished step, one after another, in this process's
environment. Each step's output goes to ``OUT/logs/<run>.<step>.log``; its exit status is recorded in
the state file. A step that fails is reported and the sweep goes on with the runs that do not depend
on it (a failed source leaves its transplant runs for the next invocation). Ctrl-C stops the sweep;
the interrupted run resumes from its newest checkpoint next time."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from scale_hyper.sweep import commands
from scale_hyper.sweep.expand import Run
from scale_hyper.sweep.spec import Spec
from scale_hyper.sweep.state import Paths, record, status, step_done, steps_of, write_state


def _run_step(paths: Paths, state: Dict, name: str, step: str, argv: List[str]) -> bool:
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / f"{name}.{step}.log"
    started = time.perf_counter()
    print(f"[sweep] {name}: {step} ... (log {log})", flush=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - started
    record(state, name, step, backend="local", rc=rc, seconds=round(seconds, 1), log=str(log))
    write_state(paths, state)
    verdict = "done" if rc == 0 else f"FAILED (exit {rc}; last lines of {log}:)"
    print(f"[sweep] {name}: {step} {verdict} in {seconds:.0f} s", flush=True)
    if rc != 0:
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-8:]), file=sys.stderr, flush=True)
    return rc == 0


def run_all(spec: Spec, paths: Paths, runs: List[Run], state: Dict, parent: Optional[str],
            extra: Sequence[str]) -> Dict[str, int]:  # fmt: skip
    """Returns counts: ran, skipped (finished), failed, blocked (a run it depends on is not finished)."""
    counts = {"ran": 0, "skipped": 0, "failed": 0, "blocked": 0}
    by_name = {r.name: r for r in runs}
    for run in runs:
        if any(not step_done(paths, by_name[n], "train") for n in run.needs):
            counts["blocked"] += 1
            print(f"[sweep] {run.name}: waits for {', '.join(run.needs)} (not finished): skipped this time")
            continue
        for step in steps_of(run, spec.eval is not None, spec.glue is not None):
            if step_done(paths, run, step):
                counts["skipped"] += 1
                continue
            if step == "train":
                was = status(paths, state, run, "train", None)
                if was == "interrupted":
                    print(f"[sweep] {run.name}: resuming from its newest checkpoint")
                argv = commands.train_local(spec, paths, run, parent, extra)
            else:
                argv = commands.step_args(spec, paths, run, step)
            counts["ran"] += 1
            if not _run_step(paths, state, run.name, step, argv):
                counts["failed"] += 1
                break  # its later steps need this one
    return counts
