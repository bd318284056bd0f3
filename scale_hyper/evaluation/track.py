"""Results to MLflow: into the training run the model came from when the store holds it (so that
`scale-hyper report` finds loss curves and downstream scores together), else into a new run."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional

from scale_hyper.config import RunConfig


def log_results(
    run: RunConfig,
    metrics: Dict[str, float],
    *,
    source_run_id: Optional[str],
    run_name: str,
    params: Optional[Dict[str, str]] = None,
    tags: Optional[Dict[str, str]] = None,
    artifacts: Optional[Dict[str, str]] = None,
) -> Optional[str]:
    """Log ``metrics`` (step 0); returns the run id written to, or None when tracking is disabled."""
    if not run.tracking.enabled:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from scale_hyper.tracking import choose_artifact_location, format_params, format_tags, resolve_tracking_uri

    uri, kind, db = resolve_tracking_uri(run.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = None
    if source_run_id:
        try:
            client.get_run(source_run_id)
            run_id = source_run_id
        except Exception:
            print(f"scale-hyper: training run {source_run_id} is not in {uri}; logging to a new run", file=sys.stderr)
    params = dict(params or {})
    if run_id is None:
        exp = client.get_experiment_by_name(run.tracking.experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(
                run.tracking.experiment,
                artifact_location=choose_artifact_location(run.tracking.artifact_location, kind, db),
            )
        )
        run_id = client.create_run(exp_id, run_name=run_name, tags={"scale_hyper.kind": "evaluation"}).info.run_id
        params.update({"model.mixer": run.model.mixer})
    else:
        # Parameters of a finished training run are immutable: evaluation settings go in as tags.
        tags = {**{f"eval.{k}": v for k, v in params.items()}, **(tags or {})}
        params = {}
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in format_params(params).items()],
        tags=[RunTag(k, v) for k, v in format_tags(tags or {}).items()],
    )
    for name, text in (artifacts or {}).items():
        client.log_text(run_id, text, name)
    if run_id != source_run_id:
        client.set_terminated(run_id, "FINISHED")
    return run_id
