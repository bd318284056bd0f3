"""MLflow tracking: a real sqlite store in a temporary directory, read back with MlflowClient.

One store is shared by the module (creating a database costs ~3 s); every test makes its own runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

import pytest

from scale_hyper.config import load_config, to_yaml
from scale_hyper.tracking import (
    NullTracker,
    TrackingError,
    is_secret_key,
    redact_params,
    redact_text,
    resolve_tracking_uri,
    start_tracker,
)

SECRETS = ("SEKRIT-TAG", "SEKRIT-AWS", "SEKRIT-PASS", "SEKRIT-HF", "SEKRIT-QUERY")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db = tmp_path_factory.mktemp("tracking") / "store" / "mlflow.db"  # "store/" does not exist yet
    return db


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}")


def _run(store, *overrides):
    return load_config([f"tracking.uri=sqlite:///{store}", "tracking.experiment=tests", *overrides])


def _everything_stored(client, run_id) -> str:
    """Every param key/value and tag key/value of the run, as one string."""
    data = client.get_run(run_id).data
    return json.dumps([data.params, data.tags])


# ---------------------------------------------------------------- new run: params, tags, secrets


def test_new_run_params_flattened_and_no_secrets(store, client, tmp_path):
    run = _run(
        store,
        "tracking.run_name=first",
        "tracking.tags.team=nlp",
        "tracking.tags.api_token=SEKRIT-TAG",
        "data.source=https://bob:SEKRIT-PASS@example.com/corpus.txt?token=SEKRIT-QUERY",
    )
    extra = {
        "world_size": 2,
        "ds_config.train_batch_size": 32,
        "aws_secret_access_key": "SEKRIT-AWS",
        "nested": {"hf_token": "SEKRIT-HF", "ok": 1},
        "mirror": "postgresql://svc:SEKRIT-PASS@db:5432/x",
        "long_value": "x" * 7000,
    }
    extra.update({f"many.p{i}": i for i in range(150)})  # > 100 params: several batches
    tracker = start_tracker(run, rank=0, resume_run_id=None, extra_params=extra)
    assert tracker.run_id
    tracker.log_text(to_yaml(run), "config.yaml")
    tracker.log_text(json.dumps({"train_batch_size": 32, "comet": {"api_key": "SEKRIT-AWS"}}), "ds_config.json")
    hint = tracker.ui_hint
    tracker.finish()

    got = client.get_run(tracker.run_id)
    p, tags = got.data.params, got.data.tags
    assert got.info.status == "FINISHED"
    assert p["model.hidden_size"] == "64" and p["train.lr"] == "0.002"
    assert p["train.adam_betas"] == "[0.9, 0.98]"
    assert p["data.tokenizer"] == "None" and p["model.pad_token_id"] == "0"  # "token" words that are no secrets
    assert p["world_size"] == "2" and p["ds_config.train_batch_size"] == "32" and p["nested.ok"] == "1"
    assert p["many.p149"] == "149"
    assert p["tracking.uri"] == f"sqlite:///{store}"
    assert len(p["long_value"]) <= 6000 and "truncated" in p["long_value"]
    assert p["data.source"].startswith("https://***@example.com/")
    assert p["mirror"] == "postgresql://***@db:5432/x"
    assert tags["team"] == "nlp" and tags["mlflow.runName"] == "first"
    stored = _everything_stored(client, tracker.run_id)
    for secret in SECRETS:
        assert secret not in stored
    for key in ("api_token", "aws_secret_access_key", "hf_token"):
        assert key not in stored

    # artifacts beside the database (not relative to the working directory), redacted text
    assert got.info.artifact_uri.startswith(str(store.parent / "mlartifacts"))
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id)) == ["config.yaml", "ds_config.json"]
    for name in ("config.yaml", "ds_config.json"):
        text = Path(client.download_artifacts(tracker.run_id, name, str(tmp_path))).read_text()
        assert not any(s in text for s in SECRETS), text
    assert "team: nlp" in Path(tmp_path / "config.yaml").read_text()

    assert hint.startswith(f"mlflow ui --backend-store-uri sqlite:///{store}")
    assert "scale-hyper[ui]" in hint and tracker.run_id in hint


# ---------------------------------------------------------------- metrics and artifacts


def test_metrics_at_steps_and_artifacts(store, client, tmp_path, caplog):
    tracker = start_tracker(_run(store, "tracking.system_metrics=true"), rank=0, resume_run_id=None, extra_params={})
    for step in (0, 10, 20):
        tracker.log_metrics({"loss": 10.0 - step / 10, "lr": 1e-3, "tokens": step * 4096}, step=step)
    with caplog.at_level(logging.WARNING, logger="scale_hyper.tracking"):
        tracker.log_metrics({"bad": "not-a-number", "ok/weird name:x": 1.0}, step=30)  # must not raise
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    tracker.log_artifact(str(tmp_path / "notes.txt"))
    tracker.log_artifact(str(tmp_path / "export"), artifact_path="hf")
    tracker.log_artifact(str(tmp_path / "missing.bin"))  # warns, does not raise
    tracker.set_tags({"phase": "pretrain", "password": "SEKRIT-PASS"})
    assert tracker.flush(30)
    tracker.finish()
    tracker.finish()  # idempotent
    tracker.log_metrics({"loss": 0.0}, step=40)  # after finish: ignored

    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 10.0), (10, 9.0), (20, 8.0)]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "ok/weird name:x")] == [30]
    assert client.get_metric_history(tracker.run_id, "bad") == []
    assert any("not a number" in r.message for r in caplog.records)
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id)) == ["hf", "notes.txt"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "hf")] == ["hf/config.json"]
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["phase"] == "pretrain" and "password" not in tags


# ---------------------------------------------------------------- resume


def test_resume_continues_the_same_run(store, client):
    first = start_tracker(_run(store, "train.lr=0.001"), rank=0, resume_run_id=None, extra_params={"world_size": 2})
    for step in (10, 20):
        first.log_metrics({"loss": 5.0 - step / 10}, step=step)
    first.finish("KILLED")
    run_id = first.run_id
    assert client.get_run(run_id).info.status == "KILLED"

    # the job comes back with a changed learning rate, world size and one new key: no param error
    second = start_tracker(
        _run(store, "train.lr=0.0005"),
        rank=0,
        resume_run_id=run_id,
        extra_params={"world_size": 4, "added_later": "yes"},
    )
    assert second.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_metrics({"loss": 1.0}, step=30)
    second.finish()

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == [10, 20, 30]
    assert got.data.params["train.lr"] == "0.001"  # immutable: the original value stays
    assert got.data.params["added_later"] == "yes"  # new keys can still be logged
    assert got.data.tags["scale_hyper.resumes"] == "1"
    assert got.data.tags["scale_hyper.resume_changed.train.lr"] == "0.001 -> 0.0005"
    assert got.data.tags["scale_hyper.resume_changed.world_size"] == "2 -> 4"
    assert len([r for r in client.search_runs([got.info.experiment_id]) if r.info.run_id == run_id]) == 1

    third = start_tracker(_run(store, "train.lr=0.0005"), rank=0, resume_run_id=run_id, extra_params={"world_size": 4})
    third.finish("FAILED")
    got = client.get_run(run_id)
    assert got.data.tags["scale_hyper.resumes"] == "2" and got.info.status == "FAILED"


def test_resume_of_unknown_run_names_uri_and_fix(store):
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(TrackingError) as err:
        start_tracker(_run(store), rank=0, resume_run_id=missing, extra_params={})
    msg = str(err.value)
    assert missing in msg and "tracking.uri=" in msg and str(store) in msg and " — set tracking.uri" in msg


# ---------------------------------------------------------------- other ranks, disabled


def test_nonzero_rank_and_disabled_never_touch_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # any mlflow import now raises ImportError
    db = tmp_path / "never" / "mlflow.db"
    for rank, enabled in ((1, "true"), (3, "true"), (0, "false")):
        run = load_config(
            [f"tracking.uri=sqlite:///{db}", f"tracking.enabled={enabled}", "tracking.system_metrics=true"]
        )
        t = start_tracker(run, rank=rank, resume_run_id="abc", extra_params={"x": 1})
        assert isinstance(t, NullTracker) and t.run_id is None and t.ui_hint == ""
        t.log_metrics({"loss": 1.0}, step=1)
        t.log_text("x", "a.txt")
        t.log_artifact("/nonexistent")
        t.set_tags({"a": "b"})
        assert t.flush()
        t.finish("FAILED")
        t.finish()
    assert os.listdir(tmp_path) == []  # no database, no mlartifacts/, no mlruns/


def test_null_tracker_is_a_context_manager():
    with NullTracker() as t:
        t.log_metrics({"a": 1.0}, step=0)
    assert t.run_id is None


# ---------------------------------------------------------------- failures


# The backlog while the store is down (kept, capped, sent when it is back): against a real `mlflow server`
# that is killed and restarted, tests/test_tracking_server.py::test_backlog_while_the_server_is_down_is_capped_and_sent_when_it_is_back.


def test_sync_sends_only_missing_points_and_is_idempotent(store, client, tmp_path):
    from scale_hyper.tracking.sync import describe, sync_metrics

    tracker = start_tracker(_run(store), rank=0, resume_run_id=None, extra_params={})
    tracker.log_metrics({"loss": 4.0, "val/acc": float("nan")}, step=1)
    tracker.log_metrics({"loss": 3.5}, step=2)
    tracker.finish()
    rows = [
        {"step": 1, "loss": 4.0, "val/acc": float("nan")},  # in MLflow already (NaN included)
        {"step": 2, "loss": 3.5},
        {"step": 3, "loss": 3.25, "grad_norm": float("inf"), "note": "text", "flag": True},
        {"step": 3, "loss": 3.25},  # a repeated line (a step redone after a crash): one point
        {"step": 4, "loss": 3.0, "weird key!": 1.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    uri = f"sqlite:///{store}"
    first = sync_metrics(uri, tracker.run_id, path)
    assert first.sent == {"loss": 2, "grad_norm": 1, "weird key_": 1} and first.status == "FINISHED"
    assert "sent 4 missing" in describe(first, uri)[0]
    assert sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")) == [
        (1, 4.0), (2, 3.5), (3, 3.25), (4, 3.0)
    ]  # fmt: skip
    again = sync_metrics(uri, tracker.run_id, path)
    assert again.total_sent == 0 and "none missing" in describe(again, uri)[0]
    assert len(client.get_metric_history(tracker.run_id, "grad_norm")) == 1


def test_sync_ends_a_run_left_running_only_when_training_finished(store, client, tmp_path):
    from scale_hyper.tracking.sync import sync_metrics

    tracker = start_tracker(_run(store), rank=0, resume_run_id=None, extra_params={})
    tracker._finished = True  # as if the process ended while the store was down: never ended
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    uri = f"sqlite:///{store}"
    assert sync_metrics(uri, tracker.run_id, tmp_path / "metrics.jsonl", dry_run=True).sent == {"loss": 1}
    assert client.get_metric_history(tracker.run_id, "loss") == []
    assert sync_metrics(uri, tracker.run_id, tmp_path / "metrics.jsonl").status == "RUNNING"
    assert sync_metrics(uri, tracker.run_id, tmp_path / "metrics.jsonl", finished=True).status == "FINISHED"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_at_start_without_leaking_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = load_config([f"tracking.uri=http://alice:SEKRIT-PASS@127.0.0.1:{_free_port()}"])
    with pytest.raises(TrackingError) as err:
        start_tracker(run, rank=0, resume_run_id=None, extra_params={})
    msg = str(err.value)
    assert "tracking.uri=http://***@127.0.0.1" in msg and "SEKRIT" not in msg and "tracking.enabled=false" in msg
    assert "connection refused" in msg and " — start the tracking server" in msg and "\n" not in msg


def test_unknown_scheme_fails_at_start():
    with pytest.raises(TrackingError, match="tracking.uri=nosuchscheme://x"):
        start_tracker(load_config(["tracking.uri=nosuchscheme://x"]), rank=0, resume_run_id=None, extra_params={})


# ---------------------------------------------------------------- pure helpers


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, kind, db = resolve_tracking_uri("sqlite:///runs/mlflow.db")
    assert kind == "sqlite" and db == tmp_path / "runs" / "mlflow.db"
    assert uri == f"sqlite:///{tmp_path}/runs/mlflow.db" and uri.startswith("sqlite:////")
    assert (tmp_path / "runs").is_dir()
    assert resolve_tracking_uri("sqlite:////abs/x.db?timeout=30")[0] == "sqlite:////abs/x.db?timeout=30"
    assert resolve_tracking_uri("https://mlflow.example.org/")[:2] == ("https://mlflow.example.org", "http")
    assert resolve_tracking_uri("file:./mlruns")[:2] == ((tmp_path / "mlruns").as_uri(), "file")
    with pytest.raises(TrackingError):
        resolve_tracking_uri("sqlite://")


@pytest.mark.parametrize(
    "key",
    [
        "api_token",
        "tracking.tags.api_token",
        "aws_secret_access_key",
        "AWS_ACCESS_KEY_ID",
        "apiKey",
        "HF_TOKEN",
        "password",
        "db_passwd",
        "credentials.user",
        "Authorization",
        "auth",
        "deepspeed.extra.comet.api_key",
        "key",
    ],
)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "data.tokenizer",
        "model.pad_token_id",
        "mask_token",
        "num_tokens",
        "key_size",
        "author",
        "model.hidden_size",
        "tracking.uri",
        "train.seed",
        "deepspeed.reduce_bucket_size",
    ],
)
def test_ordinary_keys(key):
    assert not is_secret_key(key)


def test_redaction_of_values():
    assert redact_text("https://u:p@ss@host:5000/x") == "https://***@host:5000/x"
    assert redact_text("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact_text("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1") == "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"
    assert redact_text("Authorization: Bearer abc.def") == "Authorization: ***"
    assert redact_text("HF_TOKEN=hf_abc python train.py") == "HF_TOKEN=*** python train.py"
    src = {"a": {"api_key": "x", "u": "http://a:b@h/"}, "l": ["http://a:b@h/", 1], "n": None, "lr": 0.1}
    assert redact_params(src) == {"a": {"u": "http://***@h/"}, "l": ["http://***@h/", 1], "n": None, "lr": 0.1}
    assert src["a"]["api_key"] == "x"  # the input is not modified
