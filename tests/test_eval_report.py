"""`scale-hyper report` from real MLflow runs logged into a temporary sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_module

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = {"model.hidden_size": "64", "model.num_layers": "2", "model.num_heads": "2", "model.ffn_size": "256",
            "model.vocab_size": "512", "model.max_position": "512", "model.hyper_width": "32", "model.hyper_heads": "2",
            "model.mixer_width": "64", "train.global_batch_size": "8", "data.seq_len": "64"}  # fmt: skip


@pytest.fixture
def store(tmp_path):
    need_module("matplotlib")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp", artifact_location=str(tmp_path / "art"))
    ids = {}
    for k, (mixer, losses) in enumerate([("hyperbert", [6.2, 5.1, 4.6]), ("bert", [6.2, 5.0, 4.4])]):
        run = client.create_run(exp, run_name=f"{mixer}-tiny")
        t0 = run.info.start_time
        params = {**GEOMETRY, "model.mixer": mixer}
        metrics = [Metric("val_loss", v, t0 + 1000 * (10 + k) * i, 10 * i) for i, v in enumerate(losses)]
        metrics += [
            Metric("tokens_per_s", 1000.0 * (k + 1), t0 + 500, 5),
            Metric("tokens_per_s", 3000.0 * (k + 1), t0 + 900, 10),
        ]
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(a, b) for a, b in params.items()])
        if mixer == "bert":
            client.log_metric(run.info.run_id, "glue_avg", 0.654)
        client.set_terminated(run.info.run_id)
        ids[mixer] = run.info.run_id
    return uri, ids


def test_report_renders_figures_and_table(tmp_path, store):
    from scale_hyper.evaluation import report
    from scale_hyper.models import ModelConfig, parameter_report

    uri, ids = store
    res = report.build(["cmp"], uri, tmp_path / "rep")
    rows = {r["mixer"]: r for r in res["rows"]}
    assert rows["bert"]["tokens"] == [0, 10 * 8 * 64, 20 * 8 * 64]  # step x global batch x seq_len
    assert rows["hyperbert"]["seconds"] == pytest.approx([0.0, 10.0, 20.0])
    assert rows["bert"]["tokens_per_s"] == pytest.approx(4000.0)
    mc = ModelConfig(mixer="hyperbert", vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, ffn_size=256,
                     hyper_width=32, hyper_heads=2, mixer_width=64)  # fmt: skip
    assert rows["hyperbert"]["params"] == parameter_report(mc)["total_params"]
    for png in res["figures"]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| bert-tiny | bert |" in md and "| 4.4000 |" in md and "| 65.4 |" in md and "| 4.6000 |" in md
    assert "val_loss_vs_tokens.png" in md


def test_report_cli_by_run_id_and_unknown_ref(tmp_path, store):
    uri, ids = store
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "scale_hyper",
        "report",
        ids["hyperbert"],
        f"tracking.uri={uri}",
        "--out",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| hyperbert-tiny |" in proc.stdout and "| bert-tiny |" not in proc.stdout
    assert (tmp_path / "r" / "val_loss_vs_time.png").is_file()
    bad = subprocess.run(
        [*cmd[:4], "no-such-experiment", f"tracking.uri={uri}"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert bad.returncode == 2 and "neither a run id nor an experiment" in bad.stderr
