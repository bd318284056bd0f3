"""Tracking-server faults, end to end: a real `mlflow server` (sqlite backend, loopback only) that
goes away while 2 CPU ranks train against it and comes back. Training never stalls or fails for
it, and afterwards every metric of RUN/metrics.jsonl is in MLflow: sent late by the background
writer, or back-filled by `scale-hyper track sync RUN_DIR` (idempotent).

One server per module (it takes ~8 s to start); each test stops and restarts it on the same port
and database, and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from launch import TINY_RUN, free_port, prepare_shards, run_ranks, scale_hyper, start_ranks

pytestmark = pytest.mark.slow

COMMON = [
    *TINY_RUN,
    "train.save_every=1000", "train.export=false", "deepspeed.precision=fp32",
]  # fmt: skip


class Server:
    """`mlflow server` on 127.0.0.1:PORT with a sqlite backend; stop() and start() keep port and data."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90) -> None:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / f"server-{self.starts}.log").read_text()[-3000:]
            if self.up():
                return
            time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer within {timeout} s")

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """The server goes away at once, as in a crash: its whole process group (the CLI, uvicorn)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None
        assert not self.up()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return prepare_shards(tmp_path_factory.mktemp("tracking-server"), COMMON)


def train_args(wd: Path, name: str, uri: str, *extra: str) -> list:
    return scale_hyper(
        "train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={wd}/{name}", f"tracking.uri={uri}", *extra
    )  # fmt: skip


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def wait_for_steps(run_dir: Path, n: int, procs, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = logged_steps(run_dir)
        if got >= n:
            return got
        assert all(p.poll() is None for p in procs), "training ended early: " + procs[0].communicate()[0][-4000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} steps logged within {timeout} s")


def finish(procs, timeout: float = 300) -> str:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-6000:]
    return outs[0]


def file_points(run_dir: Path) -> dict:
    """{metric: {step: value}} from metrics.jsonl."""
    points: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                points.setdefault(key, {})[row["step"]] = value
    return points


def mlflow_points(uri: str, run_id: str, keys) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


def run_id_of(run_dir: Path) -> str:
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*/trainer_state.json"))
    return json.loads(ckpt.read_text())["mlflow_run_id"]


def track_sync(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """The verb as a user runs it."""
    proc = subprocess.run(scale_hyper("track", "sync", str(run_dir), *extra), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_outage_mid_run_loses_no_metric(server, workdir):
    """The server dies after a few logged steps and is restarted (same port, same database) while
    training goes on; once the writer has delivered steps logged after the restart, the job is
    stopped (SIGUSR1: checkpoint, exit 0). Every point of metrics.jsonl is in MLflow, no sync needed."""
    from mlflow import MlflowClient

    run_dir = workdir / "outage"
    # +0.1 s a step (a test hook): the ranks leave the CPU to the restarting server (2 cores in CI)
    slow = {"SCALE_HYPER_TEST_STEP_SECONDS": "0.1"}
    procs = start_ranks(train_args(workdir, "outage", server.uri, "train.max_steps=5000"), 2, workdir, slow)
    at_stop = wait_for_steps(run_dir, 3, procs)
    server.stop()
    wait_for_steps(run_dir, at_stop + 10, procs, timeout=60)  # steps go on while nothing answers
    server.start()
    at_restart = logged_steps(run_dir)
    run_id = run_id_of_running(server.uri, run_dir)
    client = MlflowClient(tracking_uri=server.uri)
    deadline = time.monotonic() + 90  # the writer tries again at least every 10 s
    while max((m.step for m in client.get_metric_history(run_id, "loss")), default=0) < at_restart + 5:
        assert time.monotonic() < deadline, "the writer did not send again after the server came back"
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-4000:]
        time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    out = finish(procs)
    assert "stopped by" in out and "Training continues" in out  # warned once
    assert "works again" in out and "did not reach the store" not in out
    assert run_id_of(run_dir) == run_id

    want = file_points(run_dir)
    steps = sorted(want["loss"])
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > at_restart + 5
    assert mlflow_points(server.uri, run_id, want) == want  # every point of every metric, no sync needed


def run_id_of_running(uri: str, run_dir: Path) -> str:
    """The MLflow run of a run directory still training (no checkpoint yet): by its output_dir tag."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("scale-hyper")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`scale_hyper.output_dir` = '{run_dir}'")
    return run.info.run_id


def test_run_ending_while_server_down_finishes_then_sync_completes_history(server, workdir, capsys):
    run_dir = workdir / "ends-down"
    procs = start_ranks(train_args(workdir, "ends-down", server.uri, "train.max_steps=30"), 2, workdir)
    wait_for_steps(run_dir, 3, procs)
    server.stop()
    started = time.monotonic()
    out = finish(procs)  # exit 0 on every rank although the end of the run cannot be delivered
    assert time.monotonic() - started < 120
    assert "training finished" in out and f"scale-hyper track sync {run_dir}" in out
    server.start()

    run_id = run_id_of(run_dir)
    want = file_points(run_dir)
    before = mlflow_points(server.uri, run_id, want)
    assert len(before["loss"]) < len(want["loss"]) == 30  # the outage's points are missing so far
    # the run's own config names the server: no key=value needed
    first = track_sync(run_dir).stdout
    assert "sent" in first and "run status FINISHED" in first, first
    assert mlflow_points(server.uri, run_id, want) == want
    from scale_hyper.cli import main

    capsys.readouterr()
    assert main(["track", "sync", str(run_dir)]) == 0  # again (in-process: mlflow is imported already)
    again = capsys.readouterr().out
    assert "none missing" in again, again
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    assert len(client.get_metric_history(run_id, "loss")) == 30  # nothing sent twice
    assert client.get_run(run_id).info.status == "FINISHED"


def test_track_sync_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    """In-process (mlflow is imported already): a store that is down, one without the run, no run id.
    A run directory of its own (metrics.jsonl, the run id by --run-id): no other test's run needed."""
    from scale_hyper.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting wins: fail at once
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    capsys.readouterr()
    down = f"tracking.uri=http://bob:SEKRIT@127.0.0.1:{free_port()}"
    assert main(["track", "sync", str(run_dir), down, "--run-id", "0123abcd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scale-hyper: error: cannot read MLflow run 0123abcd") and "— start the store" in err
    assert "SEKRIT" not in err and "http://***@127.0.0.1" in err and err.count("\n") == 1
    other = f"tracking.uri=sqlite:///{tmp_path}/other.db"
    assert main(["track", "sync", str(run_dir), other, "--run-id", "0123abcd"]) == 2
    assert "does not exist in tracking.uri=" in capsys.readouterr().err
    assert main(["track", "sync", str(run_dir)]) == 2
    assert "it has no complete checkpoint — pass --run-id" in capsys.readouterr().err


def test_backlog_while_the_server_is_down_is_capped_and_sent_when_it_is_back(server, tmp_path, caplog):
    """Rank 0's tracker in this process, through the real outage (the server killed, then restarted):
    points logged meanwhile return at once and are kept; beyond `max_backlog` the oldest are dropped
    with one warning; a run that ends while the store is down names `scale-hyper track sync RUN_DIR`;
    one whose store came back delivers its backlog, in order, before the run is ended."""
    from mlflow import MlflowClient

    from scale_hyper.config import load_config
    from scale_hyper.tracking import start_tracker

    def tracker(name: str):
        run = load_config([f"tracking.uri={server.uri}", "tracking.experiment=backlog",
                           f"tracking.run_name={name}", f"train.output_dir={tmp_path / name}"])  # fmt: skip
        return start_tracker(run, rank=0, resume_run_id=None, extra_params={})

    kept, capped = tracker("kept"), tracker("capped")
    capped.max_backlog = 4  # the oldest points beyond it are dropped (metrics.jsonl still has them)
    for t in (kept, capped):
        t.log_metrics({"loss": 1.0}, step=1)
        assert t.flush(30)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="scale_hyper.tracking"):
        for step in range(2, 8):
            for t in (kept, capped):
                t.log_metrics({"loss": float(step)}, step=step)
        started = time.monotonic()
        assert kept.flush(30) and capped.flush(30)
        assert time.monotonic() - started < 10  # kept in the backlog, not waiting for the store
        assert (kept.undelivered, kept.dropped) == (6, 0)
        assert (capped.undelivered, capped.dropped) == (4, 2)
        capped.finish()  # the store is still down at the end of this run
        server.start()
        kept.finish()  # the backlog, tried once more at the end, reaches the store that is back
    messages = [r.getMessage() for r in caplog.records]
    assert sum("tracking failed" in m and "Training continues" in m for m in messages) == 2  # once per tracker
    assert sum("dropping the oldest" in m for m in messages) == 1
    end = [m for m in messages if "did not reach the store" in m]
    assert len(end) == 1 and f"scale-hyper track sync {tmp_path / 'capped'}" in end[0] and "6 metric point" in end[0]
    assert (kept.undelivered, kept.dropped, kept.delivered_late) == (0, 0, 6)
    client = MlflowClient(tracking_uri=server.uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(kept.run_id, "loss"))
    assert history == [(s, float(s)) for s in range(1, 8)]
    assert client.get_run(kept.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(capped.run_id, "loss")] == [(1, 1.0)]
    assert client.get_run(capped.run_id).info.status == "RUNNING"  # until `track sync` ends it


def test_server_down_at_start_fails_fast_with_uri_redacted(workdir):
    """Both ranks stop before training with rank 0's one line and exit 2 (not 'a rank died')."""
    port = free_port()  # nothing listens there
    procs = run_ranks(
        train_args(workdir, "down-at-start", f"http://alice:SEKRIT@127.0.0.1:{port}", "train.max_steps=2"),
        2, workdir, timeout=180,
    )  # fmt: skip
    for p in procs:
        assert p.returncode == 2, p.stdout[-4000:]
        errors = [line for line in p.stdout.splitlines() if line.startswith("scale-hyper: error:")]
        assert len(errors) == 1, p.stdout[-4000:]
        assert f"tracking.uri=http://***@127.0.0.1:{port}" in errors[0] and " — " in errors[0]
        assert "connection refused" in errors[0] and "tracking.enabled=false" in errors[0]
        assert "SEKRIT" not in p.stdout and "Traceback" not in p.stdout
    assert not (workdir / "down-at-start" / "checkpoints").exists()
