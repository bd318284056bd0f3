"""`scale-hyper sweep`: the spec, the expansion, bad input, run states, the statistics and the report.

Fast: nothing trains here. Run states are read from run directories laid out as training leaves them
(a checkpoint's marker, the Hugging Face export's files); the report is computed from metrics.jsonl
and `eval --per-batch` files written in their real formats with chosen losses, so the tests know
what the statistics must say. tests/test_sweep_slurm.py runs real sweeps on the test SLURM cluster.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need_module

from scale_hyper.sweep import stats
from scale_hyper.sweep.expand import expand
from scale_hyper.sweep.spec import SweepError, load
from scale_hyper.sweep.state import Paths, read_state, record, status, write_state

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))

BASE = """
name: t
output: {out}
common:
  data.vocab_size: 512
  data.seq_len: 64
  data.output: data/x
  train.global_batch_size: 8
  train.micro_batch_size: 8
  tracking.enabled: false
budget:
  steps: 4
axes:
  preset: [hyperbert-tiny, bert-tiny]
  train.seed: [1, 2]
"""


def spec_file(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("{out}", str(tmp_path / "out")))
    return path


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale_hyper", "sweep", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------
def test_expansion_names_are_stable_and_configs_resolved(tmp_path):
    runs = expand(load(str(spec_file(tmp_path))))
    assert [r.name for r in runs] == ["hyperbert-tiny_s1", "hyperbert-tiny_s2", "bert-tiny_s1", "bert-tiny_s2"]
    assert [r.mixer for r in runs] == ["hyperbert", "hyperbert", "bert", "bert"]
    assert {r.run.train.max_steps for r in runs} == {4} and {r.tokens for r in runs} == {4 * 8 * 64}
    assert [r.run.train.seed for r in runs] == [1, 2, 1, 2]
    assert [r.name for r in expand(load(str(spec_file(tmp_path))))] == [r.name for r in runs]  # stable


def test_per_preset_lr_grid_and_token_budget(tmp_path):
    text = BASE.replace("  steps: 4", "  tokens: 2048").replace(
        "  train.seed: [1, 2]",
        "  train.lr:\n    hyperbert-tiny: [1.0e-3, 2.0e-3]\n    bert-tiny: [5.0e-4]\n  train.seed: [1]",
    )
    runs = expand(load(str(spec_file(tmp_path, text))))
    assert [(r.name, r.run.train.lr) for r in runs] == [
        ("hyperbert-tiny_lr0.001_s1", 1e-3), ("hyperbert-tiny_lr0.002_s1", 2e-3), ("bert-tiny_lr0.0005_s1", 5e-4)]  # fmt: skip
    assert {r.run.train.max_steps for r in runs} == {2048 // (8 * 64)}


def test_transplant_follow_up_adds_runs_and_controls(tmp_path):
    text = BASE + "follow_ups:\n  transplant:\n    layers: [4]\n    where: {train.seed: 1}\n"
    runs = expand(load(str(spec_file(tmp_path, text))))
    derived = {r.name: r for r in runs if r.kind != "train"}
    assert set(derived) == {"hyperbert-tiny_s1-L4", "hyperbert-tiny_s1-L4-scratch", "hyperbert-tiny_s1-L2-continued",
                            "bert-tiny_s1-L4", "bert-tiny_s1-L4-scratch", "bert-tiny_s1-L2-continued"}  # fmt: skip
    t = derived["bert-tiny_s1-L4"]
    assert t.needs == ["bert-tiny_s1"] and any(o.startswith("train.init_from=") for o in t.overrides)
    assert "model.share_mixers=2" in t.overrides  # BERT keeps its 2 trained attention blocks, shared
    assert derived["bert-tiny_s1-L4-scratch"].run.train.max_steps == 8  # source + continuation
    assert derived["hyperbert-tiny_s1-L2-continued"].run.train.init_from.endswith("runs/hyperbert-tiny_s1/hf")


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
BAD = {
    "unknown axis key": (BASE.replace("  train.seed: [1, 2]", "  train.lrr: [1.0e-3]"), "train.lrr", "train.lr"),
    "collision": (BASE.replace("  train.seed: [1, 2]", "  train.seed: [1, 1]"), "share the name", "distinct"),
    "data differ": (
        BASE + "preset_overrides:\n  bert-tiny: {data.val_fraction: 0.1}\n",
        "data differ",
        "data.val_fraction",
    ),  # fmt: skip
    "budget differs": (
        BASE.replace("  steps: 4", "").replace("budget:\n", "")
        + "preset_overrides:\n  bert-tiny: {train.max_steps: 3}\n",
        "different token budgets",
        "common",
    ),  # fmt: skip
    "unknown top key": (BASE + "axis: {}\n", "unknown spec key", "valid keys"),
    "unknown preset": (BASE.replace("bert-tiny]", "bert-tinny]"), "bert-tinny", "presets"),
    "no global batch": (
        BASE.replace("train.global_batch_size: 8", "train.global_batch_size: 0"),
        "global_batch_size",
        "set train.global_batch_size",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_is_one_line_before_anything(tmp_path, case):
    text, what, fix = BAD[case]
    with pytest.raises(SweepError) as err:
        expand(load(str(spec_file(tmp_path, text))))
    assert what in str(err.value) and fix in str(err.value) and " — " in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_on_the_command_line(tmp_path):
    proc = cli(str(spec_file(tmp_path)), "--local", "--max-runs", "3")
    assert proc.returncode == 2 and proc.stderr.startswith("scale-hyper: error: ")
    assert "4 runs, more than --max-runs 3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli(str(spec_file(tmp_path, BASE.replace("train.seed", "train.sed"))), "--dry-run")
    assert proc.returncode == 2 and "unknown config key 'train.sed'" in proc.stderr and "train.seed" in proc.stderr
    proc = cli(str(spec_file(tmp_path)))  # neither --local nor --slurm
    assert proc.returncode == 2 and "--local" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# The shipped specs: each plans
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_dry_run(spec, capsys, monkeypatch):
    from scale_hyper.sweep import main

    monkeypatch.chdir(REPO)  # the specs' paths are relative to the repository root
    assert main.main(str(spec.relative_to(REPO)), [], None, True, None) == 0
    out = capsys.readouterr().out
    runs = expand(load(str(spec)))
    assert f"sweep {load(str(spec)).name}: {len(runs)} runs" in out
    assert "GPU-hours" in out and "MFU" in out and "n/a" not in out
    seeds = {r.run.train.seed for r in runs}
    assert len(seeds) >= (3 if spec.name == "cpu-study.yaml" else 5)
    assert not (REPO / str(load(str(spec)).output)).exists() or spec.name == "cpu-study.yaml"


# ------------------------------------------------------------------------------------------------
# Run states from run directories
# ------------------------------------------------------------------------------------------------
def fake_checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step_{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))


def finish(run_dir: Path, steps: int) -> None:
    fake_checkpoint(run_dir, steps)
    (run_dir / "hf").mkdir(parents=True)
    (run_dir / "hf" / "config.json").write_text("{}")
    (run_dir / "hf" / "tokenizer.json").write_text("{}")


def test_states(tmp_path):
    spec = load(str(spec_file(tmp_path)))
    runs = expand(spec)
    paths = Paths(spec.output)
    state = read_state(paths)
    finish(paths.run_dir(runs[0].name), 4)
    fake_checkpoint(paths.run_dir(runs[1].name), 2)  # interrupted
    record(state, runs[2].name, "train", backend="slurm", job="999999")  # ended without a checkpoint
    write_state(paths, state)
    state = read_state(paths)
    got = [status(paths, state, r, "train", {}) for r in runs]
    assert got == ["finished", "interrupted", "failed", "never started"]
    assert status(paths, state, runs[2], "train", {"999999": "PENDING"}) == "pending"
    assert status(paths, state, runs[2], "train", {"999999": "RUNNING"}) == "running"
    (paths.run_dir(runs[0].name) / "hf" / "tokenizer.json").unlink()  # export not complete: resume finishes it
    assert status(paths, state, runs[0], "train", {}) == "interrupted"


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def test_paired_test_matches_t_and_detects_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(5.0, 0.3, 40)
    shifted = stats.paired_test(a - 0.05 + rng.normal(0, 0.01, 40), a)
    assert shifted["p_sign_flip"] < 0.001 and shifted["mean_diff"] < 0
    same = stats.paired_test(a + rng.normal(0, 0.01, 40), a)
    assert same["p_sign_flip"] > 0.01
    from scipy import stats as sp  # a cross-check only: the module itself needs numpy alone

    d = rng.normal(0.1, 1.0, 12)
    ours = stats.paired_test(d, np.zeros(12))
    assert math.isclose(ours["t"], sp.ttest_rel(d, np.zeros(12)).statistic, rel_tol=1e-9)
    exact = sp.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
    assert math.isclose(ours["p_sign_flip"], exact, rel_tol=1e-9)


def test_seed_noise():
    n = stats.seed_noise([5.0, 5.1, 4.9], [5.5, 5.6, 5.4])
    assert math.isclose(n["diff"], -0.5) and math.isclose(n["se"], math.sqrt(2 * 0.01 / 3)) and not n["inferential"]
    assert stats.seed_noise([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])["inferential"]


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
GRID = BASE.replace("  train.seed: [1, 2]", "  train.lr:\n    hyperbert-tiny: [1.0e-3, 2.0e-3, 4.0e-3]\n"
                    "    bert-tiny: [1.0e-3, 2.0e-3]\n  train.seed: [1, 2, 3]")  # fmt: skip


def write_run(paths: Paths, run, final: float, speed: float, batches: np.ndarray) -> None:
    run_dir = paths.run_dir(run.name)
    finish(run_dir, 4)
    lines = []
    for step in range(0, 5):
        lines.append({"step": step, "val_loss": final + (4 - step) * 0.5})
        if step:
            lines.append({"step": step, "loss": 6.0, "tokens_per_s": speed, "tokens_seen": step * 512.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    doc = {"model": str(run_dir), "data": "data/x", "micro_batch_size": 8, "seq_len": 64,
           "metrics": {"val_loss": float(batches.mean())},
           "batches": [{"loss_sum": float(b) * 100, "masked_tokens": 100.0} for b in batches]}  # fmt: skip
    paths.eval_json(run.name).parent.mkdir(parents=True, exist_ok=True)
    paths.eval_json(run.name).write_text(json.dumps(doc))


def test_report_selects_lr_and_states_seed_statistics(tmp_path):
    need_module("matplotlib")
    from scale_hyper.sweep import report

    spec = load(str(spec_file(tmp_path, GRID)))
    runs = expand(spec)
    paths = Paths(spec.output)
    rng = np.random.default_rng(1)
    base = rng.normal(5.5, 0.2, 20)
    finals = {}
    for r in runs:
        # hyperbert best at 2e-3, bert best at 1e-3; hyperbert 0.1 lower at its best, seeds spread 0.02
        good = (r.mixer == "hyperbert") == (r.run.train.lr == 2e-3)
        level = (5.0 if r.mixer == "hyperbert" else 5.1) + (0 if good else 0.3) + 0.02 * r.run.train.seed
        finals[r.name] = level
        write_run(paths, r, level, 1000.0 if r.mixer == "bert" else 500.0, base + level - 5.5 + rng.normal(0, 0.01, 20))
    path = report.write(spec, paths, runs)
    text = path.read_text()
    assert "| hyperbert | 0.002 | 3 | 5.0400 ± 0.0200 | 5.0200–5.0600 | **selected** |" in text
    assert "| bert | 0.001 | 3 | 5.1400 ± 0.0200 | 5.1200–5.1600 | **selected** |" in text
    assert "3 seeds: the seed statistics below are descriptive only" in text
    # bert's best lr is the smallest it tried: said; hyperbert's lies inside its grid: not said
    assert "**Warning: the selected lr is at the edge of its grid for bert (0.001)**" in text
    row = next(
        line for line in text.splitlines() if line.startswith("| bert | -0.1000") or line.startswith("| bert | −")
    )
    assert "20 batches (20 favour hyperbert)" in row and "(descriptive)" in row
    for name in ("g0_val_loss_vs_tokens.png", "g0_val_loss_vs_flops.png", "g0_val_loss_vs_seconds.png",
                 "g0_lr_sweep.png"):  # fmt: skip
        assert (paths.report / name).stat().st_size > 10_000 and f"![{name}]({name})" in text
