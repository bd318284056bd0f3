"""MLflow tracking for a training run: one run per training job, continued across resumes.

Only rank 0 talks to MLflow. Every other rank (and ``tracking.enabled=false``) gets a
:class:`NullTracker` with the same methods, and never imports ``mlflow`` (the import alone costs
about two seconds); no module of this package imports it at import time.

Failure policy:

* at start (bad URI, unreachable server, unknown run id to resume) :func:`start_tracker` raises
  :class:`TrackingError` (a ConfigError: one line ``<what> — <fix>`` naming ``tracking.uri`` with
  credentials masked, exit 2), before any training;
* during training nothing raises or waits: the background writer keeps what a failing store could
  not take and sends it when the store is back (see :mod:`scale_hyper.tracking.trackers`);
* afterwards :mod:`scale_hyper.tracking.sync` (``scale-hyper track sync RUN_DIR``) logs the points of
  ``metrics.jsonl`` that the run still lacks.

Modules, one concern each: ``redaction`` (secrets never reach the store), ``formatting`` (params,
tags and keys within MLflow's limits), ``store`` (the store URI and artifact location),
``base`` (the Tracker interface), ``trackers`` (the MLflow background writer), ``runs`` (start or resume the run),
``sync`` (back-fill a run from its metrics.jsonl).
"""

from scale_hyper.tracking.base import NullTracker, Tracker
from scale_hyper.tracking.formatting import format_params, format_tags
from scale_hyper.tracking.redaction import is_secret_key, redact_params, redact_text
from scale_hyper.tracking.runs import start_tracker
from scale_hyper.tracking.store import TrackingError, choose_artifact_location, resolve_tracking_uri
from scale_hyper.tracking.trackers import MlflowTracker

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "choose_artifact_location",
    "format_params",
    "format_tags",
    "is_secret_key",
    "redact_params",
    "redact_text",
    "resolve_tracking_uri",
    "start_tracker",
]
