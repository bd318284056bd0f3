"""The command line of each step of a run, shared by the local runner and the SLURM submitter, so
both run exactly the same thing: train (with the run's stable output directory, MLflow names and the
sweep's tags), eval (per-batch validation losses for the paired test), GLUE, transplant, report."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence

from scale_hyper.sweep.expand import Run
from scale_hyper.sweep.spec import Spec
from scale_hyper.sweep.state import Paths

PY = [sys.executable, "-m", "scale_hyper"]


def experiment(spec: Spec) -> str:
    return str(spec.common.get("tracking.experiment", spec.name))


def tracking_uri(spec: Spec, runs: List[Run]) -> str:
    return runs[0].run.tracking.uri


def tags(spec: Spec, run: Run, parent: Optional[str]) -> List[str]:
    out = [f"tracking.tags.sweep={spec.name}", f"tracking.tags.sweep_run={run.name}",
           f"tracking.tags.sweep_kind={run.kind}"]  # fmt: skip
    # The parent link (mlflow.parentRunId, a key with a dot) is set by the sweep itself once the run
    # exists (main.link_children): a dotted key cannot pass through a config override.
    return out


def train_args(spec: Spec, paths: Paths, run: Run, parent: Optional[str], extra: Sequence[str]) -> List[str]:
    """The arguments after `scale-hyper train` (the SLURM templates add output_dir and tracking names
    themselves, to the same values)."""
    return [*run.configs, *run.overrides, *tags(spec, run, parent), *extra]


def train_local(spec: Spec, paths: Paths, run: Run, parent: Optional[str], extra: Sequence[str]) -> List[str]:
    return [*PY, "train", *train_args(spec, paths, run, parent, extra),
            f"train.output_dir={paths.run_dir(run.name)}", f"tracking.run_name={run.name}",
            f"tracking.experiment={experiment(spec)}"]  # fmt: skip


def eval_args(spec: Spec, paths: Paths, run: Run) -> List[str]:
    ev: Dict[str, Any] = spec.eval or {}
    # The same batches for every run (fixed masks, one micro batch size): the paired test needs them.
    micro = int(ev.get("batch_size", run.run.train.micro_batch_size))
    return [*PY, "eval", str(paths.run_dir(run.name)), f"eval.batches={int(ev.get('batches', 0))}",
            f"train.micro_batch_size={micro}", "--per-batch", str(paths.eval_json(run.name))]  # fmt: skip


def glue_args(spec: Spec, paths: Paths, run: Run) -> List[str]:
    g: Dict[str, Any] = spec.glue or {}
    tasks = [str(t) for t in g.get("tasks", [])]
    return [*PY, "glue", str(paths.run_dir(run.name)), *tasks, "--out", str(paths.glue_dir(run.name)),
            *[str(a) for a in g.get("args", [])]]  # fmt: skip


def transplant_args(spec: Spec, paths: Paths, run: Run) -> List[str]:
    assert run.source is not None and run.layers is not None
    return [*PY, "transplant", str(paths.run_dir(run.source)), "--layers", str(run.layers),
            "--out", str(paths.transplant_dir(f"{run.source}-L{run.layers}"))]  # fmt: skip


def report_args(spec: Spec) -> List[str]:
    return [*PY, "sweep", str(spec.path.resolve()), "--report"]


def step_args(spec: Spec, paths: Paths, run: Run, step: str) -> List[str]:
    return {"eval": eval_args, "glue": glue_args, "transplant": transplant_args}[step](spec, paths, run)
