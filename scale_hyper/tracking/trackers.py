"""The trackers the training loop holds: the do-nothing :class:`Tracker` base and
:class:`NullTracker` (every rank but 0, or tracking disabled), and rank 0's :class:`MlflowTracker`.

During training nothing raises: calls are queued and written by a background thread, so a slow or
dead server never stalls a step. A failure logs ONE warning, the store is retried with a growing
back-off, and what arrives in the meantime is dropped (counted, reported at the end). If the
process exits without :meth:`MlflowTracker.finish`, an at-exit handler ends the run as FAILED.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from scale_hyper.tracking.formatting import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    chunks,
    clean_key,
    format_tags,
)
from scale_hyper.tracking.redaction import redact_document, redact_text

logger = logging.getLogger(__name__)

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
UI_INSTALL_NOTE = "needs the full mlflow: pip install 'scale-hyper[ui]'"


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
                batch.append(Metric(clean_key(key), float(value), now, int(step)))
            except (TypeError, ValueError) as err:
                self._warn_once(f"metric:{key}", f"MLflow: metric {key!r} is not a number ({err}); not logged")
        if batch:
            self._put(("metrics", batch, "log metrics"))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._finished:
            return
        safe = redact_document(text, artifact_file)
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
        for chunk in chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
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
                for chunk in chunks(batch, MAX_METRICS_PER_BATCH):
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
