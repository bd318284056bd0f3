"""Starting rank 0's MLflow run: the experiment (found or created), a new run with its params and
default tags, or the checkpoint's run resumed (settings that changed are tagged), and the optional
system metrics monitor.

Any failure here raises :class:`TrackingError` naming ``tracking.uri`` and the fix, before training.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from scale_hyper.config.loading import flatten
from scale_hyper.config.schema import RunConfig
from scale_hyper.tracking.base import NullTracker, Tracker
from scale_hyper.tracking.formatting import (
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    chunks,
    clean_key,
    clip_value,
    format_params,
    format_tags,
)
from scale_hyper.tracking.redaction import redact_text
from scale_hyper.tracking.store import (
    TrackingError,
    choose_artifact_location,
    failure_reason,
    quick_http_failures,
    resolve_tracking_uri,
    sqlite_start_lock,
)
from scale_hyper.tracking.trackers import MlflowTracker

logger = logging.getLogger(__name__)

RESUMES_TAG = "scale_hyper.resumes"
RESUME_CHANGED_PREFIX = "scale_hyper.resume_changed."


def _import_mlflow(kind: str, uri: str):
    try:
        import mlflow  # noqa: F401  (slow: ~2 s)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as err:
        raise TrackingError(
            f"MLflow tracking is enabled but mlflow cannot be imported ({err}) — pip install "
            "'mlflow-skinny>=3' sqlalchemy alembic, or set tracking.enabled=false."
        ) from None
    if kind == "sqlite":
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError as err:
            raise TrackingError(
                f"tracking.uri={uri} is a sqlite store, which needs sqlalchemy and alembic ({err}) "
                "— pip install sqlalchemy alembic (or the full mlflow), or use an http(s):// "
                "tracking server."
            ) from None
    return MlflowClient, MlflowException


def _error_code(err: Exception) -> Optional[str]:
    return getattr(err, "error_code", None)


def _get_or_create_experiment(client: Any, name: str, artifact_location: Optional[str], shown_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception as err:
            if _error_code(err) != "RESOURCE_ALREADY_EXISTS":  # lost a race with a concurrent job: fine
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment '{name}' in tracking.uri={shown_uri} is deleted — restore it "
            f"(MlflowClient().restore_experiment('{exp.experiment_id}')) or choose another "
            "tracking.experiment."
        )
    if artifact_location and exp.artifact_location.rstrip("/") not in (
        artifact_location.rstrip("/"),
        Path(artifact_location).as_uri(),
    ):
        logger.info(
            "MLflow experiment '%s' already exists with artifact location %s; tracking.artifact_location=%s "
            "applies only to new experiments.",
            name,
            exp.artifact_location,
            artifact_location,
        )
    return exp.experiment_id


def _default_tags(run: RunConfig) -> Dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return {
        "mlflow.user": user,
        "mlflow.source.name": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
        "scale_hyper.output_dir": os.path.abspath(run.train.output_dir),
    }


def _new_run(client: Any, run: RunConfig, experiment_id: str, params: Dict[str, str]) -> str:
    from mlflow.entities import Param

    cfg = run.tracking
    tags = format_tags({**_default_tags(run), **cfg.tags})
    run_name = redact_text(cfg.run_name) if cfg.run_name else None
    mlrun = client.create_run(experiment_id, tags=tags, run_name=run_name)
    run_id = mlrun.info.run_id
    try:
        items = [Param(k, v) for k, v in params.items()]
        for chunk in chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
    except Exception:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise
    return run_id


def _resume_run(
    client: Any, run: RunConfig, run_id: str, params: Dict[str, str], shown_uri: str, configured_uri: str
) -> Tuple[str, str]:
    from mlflow.entities import Param, RunTag

    try:
        old = client.get_run(run_id)
    except Exception as err:
        if _error_code(err) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise TrackingError(
                f"cannot resume MLflow run {run_id} (recorded in the checkpoint): it does not exist in the tracking "
                f"store tracking.uri={redact_text(configured_uri)} (resolved: {shown_uri}). The checkpoint was tracked "
                "in another store - e.g. a relative sqlite:///mlflow.db resolved from a different working directory, "
                "or another tracking server — set tracking.uri to the store that holds the run (an absolute "
                "sqlite:////path/to/mlflow.db, or the original server URL), or set tracking.enabled=false to resume "
                "without tracking."
            ) from None
        raise
    if old.info.lifecycle_stage != "active":
        raise TrackingError(
            f"cannot resume MLflow run {run_id} from the checkpoint: it was deleted in "
            f"tracking.uri={shown_uri} — restore it (MlflowClient().restore_run('{run_id}')) "
            "or set tracking.enabled=false."
        )
    client.update_run(run_id, status="RUNNING")
    stored = old.data.params
    try:
        resumes = int(old.data.tags.get(RESUMES_TAG, "0")) + 1
    except ValueError:
        resumes = 1
    tags = {RESUMES_TAG: str(resumes), **format_tags(run.tracking.tags)}
    for k, v in params.items():
        if k in stored and stored[k] != v:
            tags[clean_key(RESUME_CHANGED_PREFIX + k)] = clip_value(f"{stored[k]} -> {v}", MAX_TAG_VAL_LENGTH)
    changed = [k for k in params if k in stored and stored[k] != params[k]]
    if changed:
        logger.info(
            "MLflow: resuming run %s with %d changed setting(s) (tagged %s*): %s",
            run_id,
            len(changed),
            RESUME_CHANGED_PREFIX,
            ", ".join(changed[:20]),
        )
    new_params = [Param(k, v) for k, v in params.items() if k not in stored]  # keys added since: loggable
    tag_items = [RunTag(k, v) for k, v in tags.items()]
    for chunk in chunks(tag_items, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
    for chunk in chunks(new_params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    if run.tracking.run_name and redact_text(run.tracking.run_name) != old.info.run_name:
        client.update_run(run_id, name=redact_text(run.tracking.run_name))
    return run_id, old.info.experiment_id


def _start_system_metrics(run_id: str, uri: str, resumed: bool) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=resumed)
        monitor.start()
        return monitor
    except Exception as err:  # psutil missing, ...: optional
        logger.warning(
            "MLflow: system metrics are not recorded (%s) — pip install psutil "
            "(and nvidia-ml-py for GPUs), or set tracking.system_metrics=false.",
            err,
        )
        return None


def start_tracker(run: RunConfig, *, rank: int, resume_run_id: Optional[str], extra_params: Optional[dict]) -> Tracker:
    """Rank 0: start (or, with ``resume_run_id`` from the checkpoint, continue) the MLflow run.
    Other ranks, or ``tracking.enabled=false``: a :class:`NullTracker`.

    Raises :class:`TrackingError` when the store cannot be used, so that training never starts
    with broken tracking.
    """
    cfg = run.tracking
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    uri, kind, db = resolve_tracking_uri(cfg.uri)
    shown = redact_text(uri)
    if kind == "file":
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the user chose the (deprecated) file store explicitly
    MlflowClient, _ = _import_mlflow(kind, shown)
    params = format_params({**flatten(run), **(extra_params or {})})
    try:
        with quick_http_failures(kind), sqlite_start_lock(db if kind == "sqlite" else None):
            client = MlflowClient(tracking_uri=uri)
            if resume_run_id:
                run_id, experiment_id = _resume_run(client, run, resume_run_id, params, shown, cfg.uri)
                experiment_name = client.get_experiment(experiment_id).name
                if experiment_name != cfg.experiment:
                    logger.info(
                        "MLflow: resumed run %s lives in experiment '%s' (tracking.experiment='%s')",
                        run_id,
                        experiment_name,
                        cfg.experiment,
                    )
            else:
                location = choose_artifact_location(cfg.artifact_location, kind, db)
                experiment_id = _get_or_create_experiment(client, cfg.experiment, location, shown)
                experiment_name = cfg.experiment
                run_id = _new_run(client, run, experiment_id, params)
    except TrackingError:
        raise
    except Exception as err:
        fix = (
            "start the tracking server (mlflow server --host HOST --port PORT ...) or correct tracking.uri"
            if kind == "http"
            else "check that the store is reachable and writable (sqlite:///path/mlflow.db, http(s)://host:port "
            "of a running `mlflow server`, or file:/path for the legacy file store)"
        )
        raise TrackingError(
            f"cannot start MLflow tracking at tracking.uri={shown}: {failure_reason(err)} — {fix}, "
            "or set tracking.enabled=false"
        ) from None
    monitor = _start_system_metrics(run_id, uri, bool(resume_run_id)) if cfg.system_metrics else None
    tracker = MlflowTracker(
        client,
        run_id,
        experiment_id,
        experiment_name,
        uri,
        kind,
        system_monitor=monitor,
        output_dir=os.path.abspath(run.train.output_dir),
    )
    logger.info(
        "MLflow run %s (%s) in experiment '%s' at %s",
        run_id,
        "resumed" if resume_run_id else "new",
        experiment_name,
        shown,
    )
    return tracker
