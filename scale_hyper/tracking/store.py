"""The store URI: ``tracking.uri`` resolved to what MLflow is given, where artifacts go, and how
quickly an unreachable HTTP server fails at start.

``sqlite:///mlflow.db`` by default (made absolute against the working directory, artifacts in
``mlartifacts/`` beside the database), an ``http(s)://`` tracking server, any other backend MLflow
accepts, or an explicitly chosen ``file:`` store.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple

from scale_hyper.config import ConfigError
from scale_hyper.tracking.redaction import redact_text


class TrackingError(ConfigError):
    """MLflow tracking cannot start: one line, ``<what> — <fix>``, naming tracking.uri (credentials
    masked). A :class:`ConfigError`, so the CLI prints ``scale-hyper: error: ...`` and exits 2."""


def failure_reason(err: BaseException, limit: int = 400) -> str:
    """Why a store call failed, on one line with credentials masked: for an HTTP server that is
    down or hung, a plain sentence instead of urllib3's retry chain."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    low = text.lower()
    if "connection refused" in low or "newconnectionerror" in low or "name or service not known" in low:
        return "no server answers there (connection refused)"
    if "read timed out" in low or "readtimeout" in low or "connecttimeout" in low:
        return "the server did not answer in time (timed out)"
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_tracking_uri(uri: str) -> Tuple[str, str, Optional[Path]]:
    """``(resolved uri, kind, sqlite file)``; kind is sqlite | http | file | other.

    Relative sqlite paths are made absolute against the working directory, and the database's
    directory is created. A bare path or a ``file:`` URI is an explicitly chosen file store.
    """
    uri = (uri or "").strip()
    if not uri:
        raise TrackingError(
            "tracking.uri is empty — use sqlite:///mlflow.db (the default), an http(s):// "
            "tracking server, or set tracking.enabled=false."
        )
    low = uri.lower()
    if low.startswith("sqlite:"):
        if not low.startswith("sqlite:///"):
            raise TrackingError(
                f"tracking.uri={redact_text(uri)} is not a file-backed sqlite URI "
                "— sqlite:///relative/path.db or sqlite:////absolute/path.db."
            )
        rest = uri[len("sqlite:///") :]
        path_part, sep, query = rest.partition("?")
        if path_part in ("", ":memory:"):
            raise TrackingError(
                f"tracking.uri={uri} names no database file (an in-memory store loses the run) — sqlite:///mlflow.db."
            )
        db = Path(os.path.expanduser(path_part))
        db = db if db.is_absolute() else Path.cwd() / db
        db = Path(os.path.abspath(db))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"cannot create the directory of the MLflow database {db} "
                f"(tracking.uri={uri}): {err} — point tracking.uri at a writable path."
            ) from None
        return f"sqlite:///{db.as_posix()}{sep}{query}", "sqlite", db
    if low.startswith("databricks"):
        return uri, "other", None
    if low.startswith(("http://", "https://")):
        return uri.rstrip("/"), "http", None
    if low.startswith("file:"):
        path = uri[len("file:") :]
        if path.startswith("//"):
            return uri, "file", None  # already a file:// URI
        return Path(os.path.abspath(os.path.expanduser(path))).as_uri(), "file", None
    if "://" not in uri and (":" not in uri or re.match(r"^[A-Za-z]:[\\/]", uri)):
        return Path(os.path.abspath(os.path.expanduser(uri))).as_uri(), "file", None  # a bare directory
    return uri, "other", None  # postgresql://, mysql://, databricks, ...: MLflow decides


def choose_artifact_location(configured: Optional[str], kind: str, db: Optional[Path]) -> Optional[str]:
    """Where a new experiment keeps its artifacts: ``tracking.artifact_location`` (a local path made
    absolute), else ``mlartifacts/`` beside a sqlite database, else None (the store decides)."""
    if configured:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", configured) and not configured.startswith("file:"):
            return configured  # s3://, gs://, mlflow-artifacts:/, ...
        path = configured[len("file:") :] if configured.startswith("file:") else configured
        if path.startswith("//"):
            return configured
        return os.path.abspath(os.path.expanduser(path))
    if kind == "sqlite" and db is not None:
        return str(db.parent / "mlartifacts")
    return None  # a tracking server / file store chooses its own


@contextmanager
def quick_http_failures(kind: str) -> Iterator[None]:
    """At start, fail within seconds on an unreachable server instead of MLflow's ~4 min of retries
    (unless the user set these variables themselves)."""
    chosen = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    set_here = [k for k in chosen if kind == "http" and k not in os.environ]
    for k in set_here:
        os.environ[k] = chosen[k]
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


@contextmanager
def sqlite_start_lock(db: Optional[Path]) -> Iterator[None]:
    """Processes starting runs on one sqlite store at once (two sbatch jobs submitted together, a sweep)
    take turns: MLflow creates and migrates the schema of a new database on first use, and two doing it
    concurrently fail ("Online migration expected to match one row"). An flock on ``<db>.lock``; no-op
    for other stores (``db`` None)."""
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
