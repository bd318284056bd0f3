"""MLflow tracking for a training run: one run per training job, continued across resumes.

Only rank 0 talks to MLflow. Every other rank (and ``tracking.enabled=false``) gets a
:class:`NullTracker` with the same methods, and never imports ``mlflow`` (the import alone costs
about two seconds).

The store is ``tracking.uri``: ``sqlite:///mlflow.db`` by default (made absolute against the
working directory, artifacts in ``mlartifacts/`` beside the database), an ``http(s)://`` tracking
server, any other backend MLflow accepts, or an explicitly chosen ``file:`` store.

Failure policy:

* at start (bad URI, unreachable server, unknown run id to resume) :func:`start_tracker` raises
  :class:`TrackingError` with a message naming ``tracking.uri`` and the fix, before any training;
* during training nothing raises: calls are queued and written by a background thread, so a slow
  or dead server never stalls a step. A failure logs ONE warning, the store is retried with a
  growing back-off, and what arrives in the meantime is dropped (counted, reported at the end).

Secrets never reach the store: :func:`redact_params` drops keys that name a secret (api_token,
aws_secret_access_key, password, ...) at any nesting level and masks credentials inside values
(``scheme://user:pass@host``, ``token=...``); text artifacts (the resolved config YAML, the
DeepSpeed JSON) are redacted the same way, with the secret values masked rather than dropped.
"""

from __future__ import annotations

import atexit
import getpass
import hashlib
import json
import logging
import os
import posixpath
import queue
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from scale_hyper.config.loading import flatten
from scale_hyper.config.schema import RunConfig

logger = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation), restated so that importing them needs no mlflow.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

RESUMES_TAG = "scale_hyper.resumes"
RESUME_CHANGED_PREFIX = "scale_hyper.resume_changed."
REDACTED = "***"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
UI_INSTALL_NOTE = "needs the full mlflow: pip install 'scale-hyper[ui]'"


class TrackingError(RuntimeError):
    """MLflow tracking cannot start; the message names tracking.uri and the fix."""


# ================================================================= secrets

_ALWAYS_SECRET = ("secret", "password", "passwd", "credential", "signature")
_TOKEN_NOT_SECRET_BEFORE = {
    "pad",
    "mask",
    "cls",
    "sep",
    "unk",
    "bos",
    "eos",
    "start",
    "end",
    "special",
    "max",
    "min",
    "num",
}
_FOLLOWERS_OK = {"", "value", "val", "str", "string", "id", "file", "path", "b64", "base64", "hash"}


def _words(segment: str) -> List[str]:
    """``awsSecretAccessKey`` / ``AWS-SECRET_access.key`` → ``['aws', 'secret', 'access', 'key']``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", segment)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def _secret_segment(segment: str) -> bool:
    words = _words(segment)
    for i, w in enumerate(words):
        before = words[i - 1] if i > 0 else ""
        after = words[i + 1] if i + 1 < len(words) else ""
        if any(s in w for s in _ALWAYS_SECRET) or w in ("pwd", "apikey"):
            return True
        if w.startswith("auth") and (not w.startswith("author") or w.startswith("authoriz")):
            return True  # auth, authn, authtoken, authorization; not author/authority
        # "key"/"token" are ordinary words in a model config (pad_token_id, key_size, tokenizer):
        # secret only as the name's last word (api_key, hf_token) or before id/file/value.
        if (w.endswith("key") or w.endswith("token")) and after in _FOLLOWERS_OK:
            if w == "token" and before in _TOKEN_NOT_SECRET_BEFORE:
                continue
            return True
    return False


def is_secret_key(key: Any) -> bool:
    """Whether a (possibly dotted) parameter/tag name names a secret at any level."""
    return any(_secret_segment(seg) for seg in re.split(r"[./]", str(key)))


# scheme://userinfo@host: greedy up to the last "@" before the path, so "p@ss" does not leak "ss".
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# name=value, name: value, "name": "value", ?name=value&... where the name is a secret.
_ASSIGNMENT = re.compile(
    r"""(?P<pre>(?P<q>["']?)(?P<name>[A-Za-z_][\w.\-]*)(?P=q)[ \t]*(?:=|:(?!/))[ \t]*(?P<vq>["']?))"""
    r"""(?P<val>(?:(?:Bearer|Basic|Token)[ \t]+)?[^\s"'&;,?#}\]]+)"""
)


def redact_text(text: str) -> str:
    """Mask credentials inside free text: URL user:password parts and ``secret_name=value`` pairs."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)

    def assignment(m: re.Match) -> str:
        if not is_secret_key(m["name"]) or m["val"] == REDACTED:
            return m.group(0)
        return m["pre"] + REDACTED

    return _ASSIGNMENT.sub(assignment, text)


def _redact(obj: Any, *, drop: bool) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k):
                if drop:
                    continue
                out[k] = REDACTED
            else:
                out[k] = _redact(v, drop=drop)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, drop=drop) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``params`` without secrets: secret-named keys (any level) dropped, credentials
    inside string values masked. Non-string values are kept as they are."""
    return _redact(dict(params), drop=True)


def _redact_document(text: str, artifact_file: str) -> str:
    """Redact a text artifact. YAML/JSON documents are parsed so that a secret under any key is
    masked (the structure stays loadable); anything else gets the free-text rules."""
    suffix = artifact_file.rsplit(".", 1)[-1].lower() if "." in artifact_file else ""
    try:
        if suffix == "json":
            data = json.loads(text)
            masked = _redact(data, drop=False)
            if masked != data:
                text = json.dumps(masked, indent=1)
        elif suffix in ("yaml", "yml"):
            import yaml  # PyYAML ships with omegaconf

            data = yaml.safe_load(text)
            masked = _redact(data, drop=False)
            if masked != data:
                text = yaml.safe_dump(masked, sort_keys=False, default_flow_style=False)
    except Exception:  # not really JSON/YAML: the text rules below still apply
        pass
    return redact_text(text)


# ================================================================= formatting for MLflow

_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")


def _clean_key(key: Any, limit: int = MAX_KEY_LENGTH) -> str:
    """A name MLflow accepts: allowed characters only, no path tricks, at most ``limit`` chars."""
    k = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    k = re.sub(r"/{2,}", "/", k).strip("/")
    if not k or posixpath.normpath(k) != k or k.startswith(".."):
        k = "_" + k.replace("/", "_")
    if len(k) > limit:
        digest = hashlib.sha1(k.encode()).hexdigest()[:8]
        k = f"{k[: limit - 9]}~{digest}"
    return k


def _clip(value: Any, limit: int) -> str:
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit:
        return s
    marker = f"...[truncated, {len(s)} chars]"
    return s[: limit - len(marker)] + marker


def _flatten_nested(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_params(params: Mapping[str, Any]) -> Dict[str, str]:
    """Redacted, flattened, string-valued and length-limited: exactly what is stored."""
    flat = _flatten_nested(redact_params(params))
    return {_clean_key(k): _clip(v, MAX_PARAM_VAL_LENGTH) for k, v in flat.items()}


def format_tags(tags: Mapping[str, Any]) -> Dict[str, str]:
    flat = _flatten_nested(redact_params(tags))
    return {_clean_key(k): _clip(v, MAX_TAG_VAL_LENGTH) for k, v in flat.items()}


def _chunks(items: List[Any], size: int) -> Iterator[List[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ================================================================= the store URI


def resolve_tracking_uri(uri: str) -> Tuple[str, str, Optional[Path]]:
    """``(resolved uri, kind, sqlite file)``; kind is sqlite | http | file | other.

    Relative sqlite paths are made absolute against the working directory, and the database's
    directory is created. A bare path or a ``file:`` URI is an explicitly chosen file store.
    """
    uri = (uri or "").strip()
    if not uri:
        raise TrackingError(
            "tracking.uri is empty. Fix: use sqlite:///mlflow.db (the default), an http(s):// "
            "tracking server, or set tracking.enabled=false."
        )
    low = uri.lower()
    if low.startswith("sqlite:"):
        if not low.startswith("sqlite:///"):
            raise TrackingError(
                f"tracking.uri={redact_text(uri)} is not a file-backed sqlite URI. "
                "Fix: sqlite:///relative/path.db or sqlite:////absolute/path.db."
            )
        rest = uri[len("sqlite:///") :]
        path_part, sep, query = rest.partition("?")
        if path_part in ("", ":memory:"):
            raise TrackingError(
                f"tracking.uri={uri} names no database file (an in-memory store loses the run). "
                "Fix: sqlite:///mlflow.db."
            )
        db = Path(os.path.expanduser(path_part))
        db = db if db.is_absolute() else Path.cwd() / db
        db = Path(os.path.abspath(db))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"cannot create the directory of the MLflow database {db} "
                f"(tracking.uri={uri}): {err}. Fix: point tracking.uri at a writable path."
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


def _artifact_location(configured: Optional[str], kind: str, db: Optional[Path]) -> Optional[str]:
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
def _quick_http_failures(kind: str) -> Iterator[None]:
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


# ================================================================= trackers


class Tracker:
    """The interface the training loop uses. This base class does nothing: it is what every rank
    but 0 gets (see :class:`NullTracker`). Nothing here ever raises during training."""

    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    tracking_uri: Optional[str] = None  # resolved (absolute) store URI; may hold credentials
    enabled: bool = False

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        pass

    def set_tags(self, tags: Dict[str, str]) -> None:
        pass

    def flush(self, timeout: float = 60.0) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass

    @property
    def display_uri(self) -> str:
        """The store URI with credentials masked: safe to print."""
        return redact_text(self.tracking_uri or "")

    @property
    def ui_hint(self) -> str:
        return ""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


class NullTracker(Tracker):
    """Non-zero ranks and ``tracking.enabled=false``: same methods, no store, no mlflow import."""


_Op = Tuple[str, Any, str]  # (kind, payload, description); kind: metrics | call | final | barrier | stop


class MlflowTracker(Tracker):
    """Rank 0's tracker: an MLflow run written through a background thread."""

    enabled = True

    def __init__(
        self,
        client: Any,
        run_id: str,
        experiment_id: str,
        experiment_name: str,
        tracking_uri: str,
        kind: str,
        system_monitor: Any = None,
        queue_size: int = 100_000,
    ):
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri
        self._kind = kind
        self._system_monitor = system_monitor
        self._q: queue.Queue[_Op] = queue.Queue(maxsize=queue_size)
        self._finished = False
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._warned: set = set()
        self._down_until = 0.0
        self._failures_in_row = 0
        self.dropped = 0  # operations lost to failures or a full queue
        self._thread = threading.Thread(target=self._work, name="scale-hyper-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # ------------------------------------------------------------ public API (never raises)
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        if self._finished:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                batch.append(Metric(_clean_key(key), float(value), now, int(step)))
            except (TypeError, ValueError) as err:
                self._warn_once(f"metric:{key}", f"MLflow: metric {key!r} is not a number ({err}); not logged")
        if batch:
            self._put(("metrics", batch, "log metrics"))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._finished:
            return
        safe = _redact_document(text, artifact_file)
        self._put(
            ("call", lambda: self._client.log_text(self.run_id, safe, artifact_file), f"log_text {artifact_file}")
        )

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory (in the background: keep it until :meth:`flush`/:meth:`finish`).
        Files are uploaded as they are, without redaction."""
        if self._finished:
            return
        p = os.path.abspath(path)
        if not os.path.exists(p):
            self._warn_once(f"artifact:{p}", f"MLflow: artifact {p} does not exist; not logged")
            return
        if os.path.isdir(p):
            fn = lambda: self._client.log_artifacts(self.run_id, p, artifact_path)  # noqa: E731
        else:
            fn = lambda: self._client.log_artifact(self.run_id, p, artifact_path)  # noqa: E731
        self._put(("call", fn, f"log_artifact {p}"))

    def set_tags(self, tags: Dict[str, str]) -> None:
        if self._finished:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in format_tags(tags).items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._put(("call", lambda c=chunk: self._client.log_batch(self.run_id, tags=c), "set tags"))

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued so far is written (or dropped). False on timeout."""
        if self._finished or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._put(("barrier", done, "flush"), timeout=timeout)
        return done.wait(timeout)

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        """End the run (FINISHED / FAILED / KILLED). Idempotent; waits at most ``timeout`` seconds."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            atexit.unregister(self._at_exit)
        except Exception:
            pass
        status = str(status).upper()
        if status not in TERMINAL_STATUSES:
            logger.warning("MLflow: unknown run status %r; ending the run as FAILED", status)
            status = "FAILED"
        monitor, self._system_monitor = self._system_monitor, None
        if monitor is not None:
            self._put(("final", monitor.finish, "stop system metrics"), force=True)
        self._put(
            ("final", lambda: self._client.set_terminated(self.run_id, status), f"end run ({status})"), force=True
        )
        stopped = threading.Event()
        self._put(("stop", stopped, "stop"), force=True, timeout=timeout)
        if not stopped.wait(timeout):
            logger.warning(
                "MLflow: could not write the end of run %s within %.0f s (store %s); it may stay RUNNING "
                "in the UI. Training results are not affected.",
                self.run_id,
                timeout,
                self.display_uri,
            )
        if self.dropped:
            logger.warning(
                "MLflow: %d tracking operation(s) were dropped because the store %s failed or lagged.",
                self.dropped,
                self.display_uri,
            )

    @property
    def ui_hint(self) -> str:
        run_path = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self._kind == "http":
            return f"open {self.display_uri}/{run_path}"
        return (
            f"mlflow ui --backend-store-uri {self.display_uri}   "
            f"# {UI_INSTALL_NOTE}; then open http://127.0.0.1:5000/{run_path}"
        )

    # ------------------------------------------------------------ internals
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _put(self, op: _Op, *, force: bool = False, timeout: float = 5.0) -> None:
        if self._finished and not force:
            return
        try:
            if force:
                self._q.put(op, timeout=timeout)
            else:
                self._q.put_nowait(op)
        except queue.Full:
            self.dropped += 1
            self._warn_once(
                "queue-full",
                f"MLflow: the tracking queue is full (store {self.display_uri} is too slow "
                "or down); dropping tracking data, training continues",
            )

    def _work(self) -> None:
        pending: Optional[_Op] = None
        while True:
            op, pending = (pending, None) if pending is not None else (self._q.get(), None)
            kind, payload, what = op
            if kind == "metrics":
                batch = list(payload)
                while len(batch) < MAX_METRICS_PER_BATCH:  # coalesce consecutive metric calls
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[0] == "metrics":
                        batch.extend(nxt[1])
                    else:
                        pending = nxt
                        break
                for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                    self._attempt(lambda c=chunk: self._client.log_batch(self.run_id, metrics=c), what)
            elif kind in ("call", "final"):
                self._attempt(payload, what, even_if_down=kind == "final")  # the run's end: always try once
            elif kind == "barrier":
                payload.set()
            elif kind == "stop":
                payload.set()
                return

    def _attempt(self, fn: Callable[[], Any], what: str, even_if_down: bool = False) -> None:
        if not even_if_down and time.monotonic() < self._down_until:
            self.dropped += 1
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.dropped += 1
            reason = redact_text(f"{type(err).__name__}: {err}".splitlines()[0][:500])
            if getattr(err, "error_code", None) == "INVALID_PARAMETER_VALUE":  # this request, not the store
                self._warn_once(f"invalid:{what}", f"MLflow rejected '{what}' ({reason}); skipped")
                return
            self._failures_in_row += 1
            backoff = min(5.0 * 2 ** (self._failures_in_row - 1), 300.0)
            self._down_until = time.monotonic() + backoff
            if "down" not in self._warned:
                self._warned.add("down")
                logger.warning(
                    "MLflow tracking failed (%s at '%s', store %s). Training continues; tracking data is "
                    "dropped while the store is unreachable (retrying with back-off; warned once).",
                    reason,
                    what,
                    self.display_uri,
                )
            else:
                logger.debug("MLflow still failing (%s); next try in %.0f s", reason, backoff)
        else:
            if self._failures_in_row:
                logger.info("MLflow tracking is working again (%d operation(s) dropped so far)", self.dropped)
            self._failures_in_row = 0
            self._down_until = 0.0

    def _at_exit(self) -> None:
        # The training code should call finish(); if the process ends without it, record the run
        # as failed rather than leaving it RUNNING forever. Forked children (data loader workers)
        # inherit this handler and must not end the parent's run.
        if os.getpid() == self._pid and not self._finished:
            self.finish("FAILED", timeout=15.0)


# ================================================================= start


def _import_mlflow(kind: str, uri: str):
    try:
        import mlflow  # noqa: F401  (slow: ~2 s)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as err:
        raise TrackingError(
            f"MLflow tracking is enabled but mlflow cannot be imported ({err}). Fix: pip install "
            "'mlflow-skinny>=3' sqlalchemy alembic, or set tracking.enabled=false."
        ) from None
    if kind == "sqlite":
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError as err:
            raise TrackingError(
                f"tracking.uri={uri} is a sqlite store, which needs sqlalchemy and alembic ({err}). "
                "Fix: pip install sqlalchemy alembic (or the full mlflow), or use an http(s):// "
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
            f"MLflow experiment '{name}' in tracking.uri={shown_uri} is deleted. Fix: restore it "
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
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
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
                "or another tracking server. Fix: set tracking.uri to the store that holds the run (an absolute "
                "sqlite:////path/to/mlflow.db, or the original server URL), or set tracking.enabled=false to resume "
                "without tracking."
            ) from None
        raise
    if old.info.lifecycle_stage != "active":
        raise TrackingError(
            f"cannot resume MLflow run {run_id} from the checkpoint: it was deleted in "
            f"tracking.uri={shown_uri}. Fix: restore it (MlflowClient().restore_run('{run_id}')) "
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
            tags[_clean_key(RESUME_CHANGED_PREFIX + k)] = _clip(f"{stored[k]} -> {v}", MAX_TAG_VAL_LENGTH)
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
    for chunk in _chunks(tag_items, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(new_params, MAX_PARAMS_TAGS_PER_BATCH):
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
            "MLflow: system metrics are not recorded (%s). Fix: pip install psutil "
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
        with _quick_http_failures(kind):
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
                location = _artifact_location(cfg.artifact_location, kind, db)
                experiment_id = _get_or_create_experiment(client, cfg.experiment, location, shown)
                experiment_name = cfg.experiment
                run_id = _new_run(client, run, experiment_id, params)
    except TrackingError:
        raise
    except Exception as err:
        reason = redact_text(f"{type(err).__name__}: {err}".strip())[:1500]
        raise TrackingError(
            f"cannot start MLflow tracking at tracking.uri={shown}: {reason}. Fix: check that the store is reachable "
            "and writable (sqlite:///path/mlflow.db, http(s)://host:port of a running `mlflow server`, or "
            "file:/path for the legacy file store), or set tracking.enabled=false."
        ) from None
    monitor = _start_system_metrics(run_id, uri, bool(resume_run_id)) if cfg.system_metrics else None
    tracker = MlflowTracker(client, run_id, experiment_id, experiment_name, uri, kind, system_monitor=monitor)
    logger.info(
        "MLflow run %s (%s) in experiment '%s' at %s",
        run_id,
        "resumed" if resume_run_id else "new",
        experiment_name,
        shown,
    )
    return tracker


__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "format_params",
    "is_secret_key",
    "redact_params",
    "redact_text",
    "resolve_tracking_uri",
    "start_tracker",
]
