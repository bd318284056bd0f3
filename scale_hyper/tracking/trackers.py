"""The trackers the training loop holds: the do-nothing :class:`Tracker` base and
:class:`NullTracker` (every rank but 0, or tracking disabled), and rank 0's :class:`MlflowTracker`.

During training nothing raises and nothing waits for the store: calls are queued and written by a
background thread, so a slow or dead server never stalls a step. When the store fails, ONE warning
is logged and what could not be written is kept in a backlog (at most ``max_backlog`` metric points,
the oldest dropped beyond it) and sent again, in order, with a growing back-off (2 s doubling to
10 s). Each try is one HTTP request without MLflow's own retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
0 and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 20 s unless the user set them), so the writer notices a server
that is back within one back-off step. :meth:`MlflowTracker.finish` tries the backlog once more,
even during a back-off, then ends the run; whatever is still undelivered is counted, and the warning
names ``scale-hyper track sync RUN_DIR``, which back-fills it from ``RUN_DIR/metrics.jsonl``. If the
process exits without :meth:`MlflowTracker.finish`, an at-exit handler ends the run as FAILED.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from scale_hyper.tracking.base import TERMINAL_STATUSES, UI_INSTALL_NOTE, Tracker, sync_hint
from scale_hyper.tracking.formatting import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    chunks,
    clean_key,
    format_tags,
)
from scale_hyper.tracking.redaction import redact_document, redact_text

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 2.0  # after a failure the backlog is tried again in 2 s, then 4, 8, 10, 10, ... s
BACKOFF_MAX_S = 10.0  # a down store gets one request every 10 s: cheap, and no long wait once it is back
# One request per try while training (the writer's back-off is the retry), and no request hangs for
# minutes on a server that accepts connections but does not answer; a user's own setting wins.
WRITER_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


_Op = Tuple[str, Any, str]  # (kind, payload, description); kind: metrics | call | final | end | barrier | stop


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
        max_backlog: int = 200_000,
        output_dir: Optional[str] = None,
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
        self.dropped = 0  # lost to a full queue, a full backlog or a rejected request (metric points count one each)
        self.delivered_late = 0  # metric points written after the store came back
        self.run_ended = False  # the run's final status reached the store
        self.max_backlog = max_backlog  # metric points kept while the store is down (~200 B each)
        self.output_dir = output_dir  # the run directory whose metrics.jsonl `track sync` reads
        self._backlog: Deque[_Op] = collections.deque()  # failed writes, oldest first, sent again in order
        self._backlog_points = 0  # metric points in the backlog
        self._backlog_calls = 0  # other operations in it (texts, tags, artifacts)
        self._env_set = [k for k in WRITER_HTTP_SETTINGS if kind == "http" and k not in os.environ]
        for k in self._env_set:
            os.environ[k] = WRITER_HTTP_SETTINGS[k]
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
        """Wait until everything queued so far is written, or kept for later while the store is down
        (or dropped). False on timeout."""
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
        self._put(("end", lambda: self._client.set_terminated(self.run_id, status), f"end run ({status})"), force=True)
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
        for k in self._env_set:
            os.environ.pop(k, None)
        self._env_set = []
        lost = self.dropped + self.undelivered
        if lost or not self.run_ended:
            logger.warning(
                "MLflow: %d metric point(s)/operation(s) did not reach the store %s (it failed or lagged)%s. "
                "Every metric is in %s: `%s` sends what is missing once the store is back.",
                lost,
                self.display_uri,
                "" if self.run_ended else f", and run {self.run_id} stays RUNNING there until then",
                os.path.join(self.output_dir, "metrics.jsonl") if self.output_dir else "RUN_DIR/metrics.jsonl",
                sync_hint(self.output_dir),
            )
        elif self.delivered_late:
            logger.info(
                "MLflow: %d metric point(s) were delivered late, after the store came back", self.delivered_late
            )

    @property
    def undelivered(self) -> int:
        """Metric points (and other operations) still in the backlog."""
        return self._backlog_points + self._backlog_calls

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

    def _next(self, pending: Optional[_Op]) -> Optional[_Op]:
        """The next operation; None when it is time to try the backlog again."""
        if pending is not None:
            return pending
        if not self._backlog:
            return self._q.get()
        try:
            return self._q.get(timeout=max(0.0, self._down_until - time.monotonic()))
        except queue.Empty:
            return None

    def _work(self) -> None:
        pending: Optional[_Op] = None
        while True:
            op, pending = self._next(pending), None
            if op is None:
                self._send_backlog()
                continue
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
                    self._send(("metrics", chunk, what))
            elif kind == "call":
                self._send(op)
            elif kind == "final":  # local work at the end (the system metrics monitor): always done
                self._send_backlog(force=True)
                self._attempt(payload, what)
            elif kind == "end":
                # The backlog and then the run's status, each tried once even during a back-off; a store
                # that has just failed is not asked again (a hung server costs 20 s a try).
                self._send_backlog(force=True)
                if not self._backlog:
                    self.run_ended = self._attempt(payload, what) is True
            elif kind == "barrier":
                payload.set()
            elif kind == "stop":
                payload.set()
                return

    def _write(self, op: _Op) -> None:
        kind, payload, _ = op
        if kind == "metrics":
            self._client.log_batch(self.run_id, metrics=payload)
        else:
            payload()

    def _send(self, op: _Op) -> None:
        """Write now; while the store is down, behind the older writes kept in the backlog."""
        if self._backlog or time.monotonic() < self._down_until:
            self._keep(op)
            self._send_backlog()
        elif self._attempt(functools.partial(self._write, op), op[2]) is False:
            self._keep(op)

    def _keep(self, op: _Op, front: bool = False) -> None:
        if front:
            self._backlog.appendleft(op)
        else:
            self._backlog.append(op)
        if op[0] == "metrics":
            self._backlog_points += len(op[1])
        else:
            self._backlog_calls += 1
        while self._backlog_points > self.max_backlog or len(self._backlog) > self.max_backlog:
            kind, payload, what = self._backlog[0]
            excess = self._backlog_points - self.max_backlog
            if kind == "metrics" and 0 < excess < len(payload):  # drop only the oldest points of the batch
                self._backlog[0] = (kind, payload[excess:], what)
                lost = excess
            else:
                self._backlog.popleft()
                lost = len(payload) if kind == "metrics" else 1
            if kind == "metrics":
                self._backlog_points -= lost
            else:
                self._backlog_calls -= 1
            self.dropped += lost
            self._warn_once(
                "backlog-full",
                f"MLflow: the store {self.display_uri} is down for longer than {self.max_backlog} metric points; "
                f"dropping the oldest (all are in metrics.jsonl: `{sync_hint(self.output_dir)}` sends them "
                "later); training continues",
            )

    def _send_backlog(self, force: bool = False) -> None:
        """Send the backlog in order (consecutive metric batches merged into full requests) until it
        is empty or a write fails. ``force``: even during a back-off (the end of the run)."""
        while self._backlog and (force or time.monotonic() >= self._down_until):
            op = self._backlog.popleft()
            if op[0] != "metrics":
                self._backlog_calls -= 1
            else:
                self._backlog_points -= len(op[1])
                batch: List[Any] = list(op[1])
                while self._backlog and self._backlog[0][0] == "metrics":
                    if len(batch) + len(self._backlog[0][1]) > MAX_METRICS_PER_BATCH:
                        break
                    nxt = self._backlog.popleft()
                    self._backlog_points -= len(nxt[1])
                    batch.extend(nxt[1])
                op = ("metrics", batch, op[2])
            result = self._attempt(functools.partial(self._write, op), op[2])
            if result is False:
                self._keep(op, front=True)
                return
            if result and op[0] == "metrics":
                self.delivered_late += len(op[1])

    def _attempt(self, fn: Callable[[], Any], what: str) -> Optional[bool]:
        """True: written. False: the store failed (keep the write, back off). None: the store rejected
        this request itself (warned and skipped: sending it again would fail again)."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            reason = redact_text(f"{type(err).__name__}: {err}".splitlines()[0][:500])
            if getattr(err, "error_code", None) == "INVALID_PARAMETER_VALUE":  # this request, not the store
                self.dropped += 1
                self._warn_once(f"invalid:{what}", f"MLflow rejected '{what}' ({reason}); skipped")
                return None
            self._failures_in_row += 1
            backoff = min(BACKOFF_FIRST_S * 2 ** (self._failures_in_row - 1), BACKOFF_MAX_S)
            self._down_until = time.monotonic() + backoff
            if "down" not in self._warned:
                self._warned.add("down")
                logger.warning(
                    "MLflow tracking failed (%s at '%s', store %s). Training continues; tracking data is kept "
                    "and sent when the store is back (retrying with back-off up to %.0f s; warned once).",
                    reason,
                    what,
                    self.display_uri,
                    BACKOFF_MAX_S,
                )
            else:
                logger.debug("MLflow still failing (%s); next try in %.0f s", reason, backoff)
            return False
        if self._failures_in_row:
            logger.warning(
                "MLflow tracking works again (after %d failed tr%s); sending what was kept (%d metric point(s))",
                self._failures_in_row,
                "y" if self._failures_in_row == 1 else "ies",
                self._backlog_points,
            )
        self._failures_in_row = 0
        self._down_until = 0.0
        return True

    def _at_exit(self) -> None:
        # The training code should call finish(); if the process ends without it, record the run
        # as failed rather than leaving it RUNNING forever. Forked children (data loader workers)
        # inherit this handler and must not end the parent's run.
        if os.getpid() == self._pid and not self._finished:
            self.finish("FAILED", timeout=15.0)
