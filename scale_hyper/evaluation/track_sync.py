"""`scale-hyper track sync RUN_DIR [key=value ...]`: complete a run's MLflow history from its
``metrics.jsonl`` after a tracking-server outage (idempotent: only missing points are sent).

The MLflow run id comes from the newest complete checkpoint's ``trainer_state.json`` (or
``--run-id``), the store from the config the run was trained with (the checkpoint's, else
``RUN/config.yaml``) with ``key=value`` overrides on top, e.g. ``tracking.uri=http://host:5000``.
A run that is still RUNNING in MLflow although its final checkpoint exists (the end of the run was
not delivered) is ended as FINISHED.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Optional

from scale_hyper import runs
from scale_hyper.config import ConfigError, RunConfig, load_config


def _config(rd: runs.RunDir, state: Dict[str, Any], overrides: List[str]) -> RunConfig:
    if "config_yaml" in state:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as f:
                f.write(state["config_yaml"])
            return load_config([path, *overrides])
    if rd.config.is_file():
        return load_config([str(rd.config), *overrides])
    return load_config(overrides)


def main(run_dir: str, overrides: List[str], run_id: Optional[str] = None, dry_run: bool = False) -> int:
    from scale_hyper.tracking import sync

    rd = runs.RunDir(run_dir)
    if not rd.metrics.is_file():
        raise ConfigError(
            f"{rd.metrics} does not exist — pass a run directory (the train.output_dir of a run; rank 0 "
            "writes its metrics.jsonl)"
        )
    ckpt = rd.newest()
    state = runs.read_state(ckpt) if ckpt is not None else {}
    run_id = run_id or state.get("mlflow_run_id")
    if not run_id:
        found = f"its newest checkpoint {ckpt} records none" if ckpt else "it has no complete checkpoint"
        raise ConfigError(
            f"no MLflow run id for {run_dir}: {found} — pass --run-id RUN_ID (printed as 'MLflow run ...' when "
            "training started)"
        )
    run = _config(rd, state, overrides)
    finished = ckpt is not None and int(state.get("step", -1)) >= run.train.max_steps
    result = sync.sync_metrics(run.tracking.uri, run_id, rd.metrics, finished=finished, dry_run=dry_run)
    for line in sync.describe(result, sync.shown(run.tracking.uri), dry_run):
        print(line)
    return 0
