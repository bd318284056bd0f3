"""`scale-hyper sweep SPEC.yaml [--local | --slurm | --report | --status] [--dry-run] [--max-runs N] [key=value ...]`.

Reads and checks the spec, expands it (every run resolved; bad input refused before anything runs),
then: ``--dry-run`` prints the plan; ``--status`` each run's state; ``--report`` writes the report of
what has finished; ``--local`` runs what is not finished here, one after another; ``--slurm``
submits it as dependent jobs. Trailing ``key=value`` words apply to every run (after the spec's own).
Re-running is always safe: finished steps are skipped, interrupted runs resume from their newest
checkpoint, queued jobs are left alone, failed ones are resubmitted.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from scale_hyper.sweep.expand import Run, expand
from scale_hyper.sweep.spec import Spec, SweepError, load
from scale_hyper.sweep.state import Paths, active, alive_jobs, read_state, status, steps_of, write_state


def parent_run(spec: Spec, runs: List[Run], state: Dict) -> Optional[str]:
    """The sweep's MLflow parent run (created once, its id kept in the state file); every run of the
    sweep carries it as ``mlflow.parentRunId``. None when the runs do not track."""
    tracking = runs[0].run.tracking
    if not tracking.enabled:
        return None
    if state.get("parent_run_id"):
        return str(state["parent_run_id"])
    from mlflow import MlflowClient

    from scale_hyper.sweep.commands import experiment
    from scale_hyper.tracking import resolve_tracking_uri

    uri, _, _ = resolve_tracking_uri(tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment(spec))
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment(spec))
    run = client.create_run(exp_id, run_name=f"sweep {spec.name}",
                            tags={"scale_hyper.kind": "sweep", "sweep": spec.name, "sweep.spec": str(spec.path),
                                  "sweep.runs": str(len(runs))})  # fmt: skip
    client.set_terminated(run.info.run_id, "FINISHED")  # a container: its children carry the metrics
    state["parent_run_id"] = run.info.run_id
    return str(run.info.run_id)


def link_children(spec: Spec, runs: List[Run], parent: Optional[str]) -> int:
    """Nest the sweep's MLflow runs (tag ``sweep``) under its parent run; returns how many were linked.
    Called after each local run, at each invocation and by the report job (SLURM runs start later)."""
    if not parent:
        return 0
    from mlflow import MlflowClient

    from scale_hyper.sweep.commands import experiment
    from scale_hyper.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(runs[0].run.tracking.uri)[0])
    exp = client.get_experiment_by_name(experiment(spec))
    if exp is None:
        return 0
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{spec.name}'", max_results=5000)
    linked = 0
    for r in found:
        if r.info.run_id != parent and r.data.tags.get("mlflow.parentRunId") != parent:
            client.set_tag(r.info.run_id, "mlflow.parentRunId", parent)
            linked += 1
    return linked


def status_table(spec: Spec, paths: Paths, runs: List[Run], state: Dict, jobs: Optional[Dict[str, str]]) -> str:
    lines = []
    for r in runs:
        steps = steps_of(r, spec.eval is not None, spec.glue is not None)
        lines.append(f"{r.name:<40} " + "  ".join(f"{s}: {status(paths, state, r, s, jobs)}" for s in steps))
    return "\n".join(lines)


def main(spec_path: str, extra: Sequence[str], backend: Optional[str], dry_run: bool, max_runs: Optional[int],
         report_only: bool = False, status_only: bool = False) -> int:  # fmt: skip
    spec = load(spec_path)
    runs = expand(spec, extra, max_runs)
    paths = Paths(spec.output)
    state = read_state(paths)
    if report_only:
        from scale_hyper.sweep import report

        link_children(spec, runs, state.get("parent_run_id"))
        out = report.write(spec, paths, runs)
        print(f"written: {out}")
        return 0
    jobs = alive_jobs()
    if status_only:
        print(status_table(spec, paths, runs, state, jobs))
        return 0
    if dry_run:
        from scale_hyper.sweep.plan import render

        print(render(spec, paths, runs, state, jobs))
        if backend:
            print(f"(dry run: nothing was {'submitted' if backend == 'slurm' else 'started'})")
        return 0
    if backend is None:
        raise SweepError(f"{spec.path}: say where the runs go — add --local (here, one after another) or --slurm "
                         "(dependent jobs); --dry-run shows the plan first")  # fmt: skip
    if backend == "slurm" and jobs is None:
        raise SweepError(f"{spec.path}: --slurm, but squeue is missing or does not answer — run it where SLURM "
                         "commands work (a login node), or use --local")  # fmt: skip
    busy = active(paths, state, jobs)
    if backend == "local" and busy:
        raise SweepError(f"{spec.path}: jobs of this sweep are still queued or running ({', '.join(sorted(busy))}) — "
                         "wait for them or scancel them before running it locally")  # fmt: skip
    parent = parent_run(spec, runs, state)
    write_state(paths, {**state, "name": spec.name, "spec": str(spec.path)})
    state = read_state(paths)
    if backend == "local":
        from scale_hyper.sweep.local import run_all

        counts = run_all(spec, paths, runs, state, parent, extra)
        link_children(spec, runs, parent)
        print(f"[sweep] {spec.name}: {counts['ran']} step(s) run, {counts['failed']} failed, "
              f"{counts['skipped']} already finished, {counts['blocked']} waiting for a failed source")  # fmt: skip
        if spec.eval is not None or any(status(paths, state, r, "train", None) == "finished" for r in runs):
            from scale_hyper.sweep import report

            print(f"written: {report.write(spec, paths, runs)}")
        return 1 if counts["failed"] else 0
    from scale_hyper.sweep.slurm import Submitter

    link_children(spec, runs, parent)  # runs of earlier invocations
    submitted = Submitter(spec, paths, state, jobs or {}, extra).submit(runs, parent)
    if not submitted:
        print(f"[sweep] {spec.name}: nothing to submit (every step finished or queued)")
    else:
        print(f"[sweep] {spec.name}: {len(submitted)} job(s) submitted; state in {paths.state}; "
              f"`scale-hyper sweep {spec.path} --status` shows progress")  # fmt: skip
    return 0
