"""The sweep report's clock check, on recorded real runs (no training here).

tests/data/sweep_clock.json holds the metrics.jsonl of real `scale-hyper sweep --local` runs (2 mixers
× 3 seeds), recorded by tests/data/record_sweep_clock.py: a quiet sweep, whose every step the
trainer's test hook lengthens by the same sleep, so the runs' speed agrees on a shared machine; and
the same sweep with two runs trained again under a longer sleep (slowed on purpose). The report
must warn, with each mixer's spread, on the slowed one and stay silent on the quiet one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_sweep import finish

from scale_hyper.sweep.expand import expand
from scale_hyper.sweep.spec import load
from scale_hyper.sweep.state import Paths

RECORDED = json.loads((Path(__file__).parent / "data" / "sweep_clock.json").read_text())
WARNING = "**Warning: the wall-clock figures measure the machine, not the mixers.**"


def _report(tmp_path: Path, metrics: dict) -> str:
    pytest.importorskip("matplotlib")
    from scale_hyper.sweep import report

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(RECORDED["spec"].format(out=tmp_path / "out", data=tmp_path / "data"))
    spec = load(str(spec_path))
    runs = expand(spec)
    paths = Paths(spec.output)
    assert sorted(r.name for r in runs) == sorted(metrics)
    for r in runs:
        run_dir = paths.run_dir(r.name)
        finish(run_dir, r.run.train.max_steps)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics[r.name]))
    return report.write(spec, paths, runs).read_text()


def _row(text: str, mixer: str) -> str:
    """The mixer's row of the comparison at the selected lr (the table whose second column is params)."""
    return next(line for line in text.splitlines() if re.match(rf"\| {mixer} \| \d+,\d{{3}} \| ", line))


def _pct(cv: float) -> str:
    return f"±{100 * cv:.2g} %"


def _seconds_per_token(records) -> float:
    """The run's time per token straight from its records (the report's computation, redone here)."""
    seen, seconds = 0.0, 0.0
    for rec in records:
        if rec.get("tokens_per_s"):
            seconds += (rec["tokens_seen"] - seen) / rec["tokens_per_s"]
            seen = rec["tokens_seen"]
    return seconds / seen


def _spread(metrics: dict, mixer: str) -> float:
    values = np.array([_seconds_per_token(m) for name, m in metrics.items() if name.startswith(f"{mixer}-")])
    return float(values.std(ddof=1) / values.mean())


def test_recorded_runs_are_what_they_claim():
    quiet, slowed = RECORDED["quiet"], RECORDED["slowed"]
    for name in RECORDED["slowed_runs"]:
        assert _seconds_per_token(slowed[name]) > 1.5 * _seconds_per_token(quiet[name]), name
    assert max(_spread(quiet, m) for m in ("hyperbert", "bert")) < 0.10


def test_quiet_sweep_has_no_clock_warning(tmp_path):
    text = _report(tmp_path, RECORDED["quiet"])
    assert WARNING not in text and "unreliable" not in text.lower()
    worst = max(_spread(RECORDED["quiet"], m) for m in ("hyperbert", "bert"))
    assert f"by at most {_pct(worst)} (limit ±10 %): the wall-clock comparison stands" in text
    assert re.search(r"equal wall-clock = \d+ s", text)
    assert f"| {_pct(_spread(RECORDED['quiet'], 'bert'))} |" in _row(text, "bert")


def test_slowed_sweep_marks_the_wall_clock_unreliable(tmp_path):
    metrics = {**RECORDED["quiet"], **RECORDED["slowed"]}
    text = _report(tmp_path, metrics)
    assert WARNING in text
    for mixer in ("hyperbert", "bert"):
        pct = _pct(_spread(metrics, mixer))
        assert f"{mixer} {pct} over 3 runs" in text  # the spread, named per mixer
        assert f"| unreliable ({pct}) |" in _row(text, mixer)
    assert "equal wall-clock is not compared: the clock spread is above the limit" in text
    assert (tmp_path / "out" / "report" / "g0_val_loss_vs_seconds.png").stat().st_size > 10_000


def test_token_axes_read_k_and_m():
    pytest.importorskip("matplotlib")
    from scale_hyper.sweep.plots import si_formatter

    f = si_formatter()
    assert [f(x) for x in (0, 200_000, 1_200_000, 6.39e11)] == ["0", "200k", "1.2M", "639G"]
