"""Back-fill an MLflow run from the metrics its training wrote to ``metrics.jsonl``.

Rank 0 appends every logged metric to ``RUN/metrics.jsonl`` whatever happens to the store; what the
background writer could not deliver (a store still down when training ended, a backlog overflow)
is missing from MLflow only. :func:`sync_metrics` compares, per metric, the run's MLflow history
with the file and logs only the (step, value) points MLflow lacks: running it again adds nothing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple, Union

from scale_hyper.tracking.formatting import MAX_METRICS_PER_BATCH, chunks, clean_key
from scale_hyper.tracking.redaction import redact_text
from scale_hyper.tracking.store import TrackingError, failure_reason, quick_http_failures, resolve_tracking_uri

logger = logging.getLogger(__name__)

Point = Tuple[int, Union[float, str]]  # (step, value as MLflow stores it; "nan" for NaN)


def _stored_value(value: float) -> Union[float, str]:
    """The value as MLflow keeps it: NaN is a flag, ±inf become ±the largest float."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return sys.float_info.max if value > 0 else -sys.float_info.max
    return value


def read_metrics_file(path: Union[str, Path]) -> Dict[str, Dict[Point, float]]:
    """``{metric key as logged: {(step, stored value): value}}`` from a metrics.jsonl (one JSON
    object a line with a ``step``; non-numeric values and unreadable lines are skipped, as the
    tracker skips them)."""
    points: Dict[str, Dict[Point, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                logger.warning("%s:%d: not a metrics line; skipped", path, number)
                continue
            for key, value in row.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                points.setdefault(clean_key(key), {})[(step, _stored_value(float(value)))] = float(value)
    return points


@dataclass
class SyncResult:
    run_id: str
    status: str  # the run's status in MLflow after the sync
    in_file: int = 0  # distinct (metric, step, value) points in metrics.jsonl
    sent: Dict[str, int] = field(default_factory=dict)  # metric -> points logged now

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def _client(uri: str) -> Tuple[Any, str, str]:
    resolved, kind, _ = resolve_tracking_uri(uri)
    try:
        from mlflow import MlflowClient
    except ImportError as err:
        raise TrackingError(f"mlflow cannot be imported ({err}) — pip install -e . (mlflow-skinny)") from None
    return MlflowClient(tracking_uri=resolved), kind, redact_text(resolved)


def sync_metrics(
    uri: str, run_id: str, metrics_file: Union[str, Path], *, finished: bool = False, dry_run: bool = False
) -> SyncResult:
    """Log the points of ``metrics_file`` that run ``run_id`` in store ``uri`` lacks. ``finished``:
    training is known to have completed, so a run still RUNNING (its end was never delivered) is
    ended as FINISHED. Raises :class:`TrackingError` (one line, ``<what> — <fix>``) when the store
    or the run cannot be read."""
    from mlflow.entities import Metric

    client, kind, shown = _client(uri)
    wanted = read_metrics_file(metrics_file)
    try:
        with quick_http_failures(kind):
            run = client.get_run(run_id)
    except Exception as err:
        code = getattr(err, "error_code", None)
        if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise TrackingError(
                f"MLflow run {run_id} does not exist in tracking.uri={shown} — pass the store that holds it "
                "(tracking.uri=...; a relative sqlite:///mlflow.db is resolved from the current directory)"
            ) from None
        raise TrackingError(
            f"cannot read MLflow run {run_id} at tracking.uri={shown}: {failure_reason(err)} — start the store "
            "(or correct tracking.uri) and run the sync again; it only sends what is missing"
        ) from None
    result = SyncResult(run_id, run.info.status, in_file=sum(len(p) for p in wanted.values()))
    now = int(time.time() * 1000)
    try:
        with quick_http_failures(kind):
            for key, points in sorted(wanted.items()):
                have: Set[Point] = {(m.step, _stored_value(m.value)) for m in client.get_metric_history(run_id, key)}
                missing = [Metric(key, value, now, p[0]) for p, value in points.items() if p not in have]
                missing.sort(key=lambda m: m.step)
                if not missing:
                    continue
                result.sent[key] = len(missing)
                if not dry_run:
                    for chunk in chunks(missing, MAX_METRICS_PER_BATCH):
                        client.log_batch(run_id, metrics=chunk)
            if finished and run.info.status == "RUNNING" and not dry_run:
                client.set_terminated(run_id, "FINISHED")
                result.status = "FINISHED"
    except Exception as err:
        raise TrackingError(
            f"syncing MLflow run {run_id} at tracking.uri={shown} failed: {failure_reason(err)} — "
            f"run the sync again when the store answers; it only sends what is still missing "
            f"({result.total_sent} point(s) were being sent)"
        ) from None
    return result


def describe(result: SyncResult, shown_uri: str, dry_run: bool = False) -> List[str]:
    """What a sync did, for the terminal."""
    verb = "would send" if dry_run else "sent"
    lines = [
        f"MLflow run {result.run_id} at {shown_uri}: {result.in_file} point(s) in metrics.jsonl, "
        + (f"{verb} {result.total_sent} missing" if result.total_sent else "none missing")
        + f"; run status {result.status}"
    ]
    lines += [f"  {key}: {verb} {n}" for key, n in sorted(result.sent.items())]
    return lines


def shown(uri: str) -> str:
    """``uri`` resolved and with credentials masked (what messages print)."""
    return redact_text(resolve_tracking_uri(uri)[0])


__all__ = ["SyncResult", "describe", "read_metrics_file", "shown", "sync_metrics"]
