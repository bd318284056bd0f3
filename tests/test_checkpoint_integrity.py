"""Checkpoint manifests, for real: written at save, checked before every load (issue #25).

ONE base training on 2 CPU ranks (6 steps, a checkpoint every 2: step_2, step_4, step_6) is copied once
per fault, and each copy's newest checkpoint is damaged the way storage damages files: a truncated
optimizer shard (what a quota hit or a partial copy leaves), one flipped byte (which torch loads
without complaint), a missing rank file, a missing manifest. Each copy is resumed with the base's own
command (train.resume=auto) on 2 ranks: one warning line naming the checkpoint, the file and what
differs; the damaged directory set aside, not deleted; resumed from step_4, the newest intact one; and
the same losses and final weights as the uninterrupted base run (bit-exact on CPU: a resume at the
same world size is, tests/test_engine.py). A checkpoint saved before manifests resumes too (one more
2-rank launch); an explicit damaged train.resume=PATH is refused (one process, no training); readers
(export, eval, init_from, checkpoint universal), the marker's and manifest's own checksums and rotation
are checked in this process on copies of the same files.

The SLURM case (a requeue after the newest checkpoint was damaged completes) reuses tests/test_slurm.py's
cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from launch import TINY_RUN, prepare_shards, run_ranks, scale_hyper
from test_slurm import TRAIN, cluster, job_env, run, shards, submit  # noqa: F401  (fixtures reused)

from scale_hyper import runs
from scale_hyper.runs import manifest

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    *TINY_RUN,
    "deepspeed.precision=fp32", f"train.max_steps={STEPS}", "train.save_every=2", "train.export=false",
    "tracking.enabled=false", "train.keep_checkpoints=0",
]  # fmt: skip
OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def train_cmd(wd: Path, out: Path, *extra: str) -> list:
    return scale_hyper("train", *COMMON, f"data.output={wd}/shards", f"train.output_dir={out}", *extra)


def losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def weights(ckpt: Path) -> dict:
    return runs.consolidated_state_dict(ckpt)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The uninterrupted run; its losses and final weights, taken before any copy is damaged."""
    wd = prepare_shards(tmp_path_factory.mktemp("integrity"), COMMON)
    out = wd / "base"
    results = run_ranks(train_cmd(wd, out), 2, wd)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    ckpts = runs.RunDir(out).complete_checkpoints()
    assert [c.name for c in ckpts] == ["step_2", "step_4", "step_6"]
    return {"wd": wd, "out": out, "losses": losses(out), "weights": weights(ckpts[-1])}


def copy_of(base: dict, name: str) -> Path:
    out = base["wd"] / name
    shutil.copytree(base["out"], out)
    return out


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# name: (file of step_6, how it is damaged, what the warning line and `checkpoint verify` must say)
FAULTS = {
    "truncated": (OPTIM.format(0), lambda p: p.write_bytes(p.read_bytes()[:1000]),
                  re.escape(OPTIM.format(0)) + r" is 1,000 bytes, the manifest says [\d,]+"),
    "flipped-byte": (MODEL, flip_a_byte,
                     re.escape(MODEL) + r" has xxh3_64 [0-9a-f]+, the manifest says [0-9a-f]+ \(same size"),
    "missing-rank-file": (OPTIM.format(1), Path.unlink, re.escape(OPTIM.format(1)) + " is missing"),
    "missing-manifest": ("manifest.json", Path.unlink, r"manifest\.json is missing"),
}  # fmt: skip


def verify_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(scale_hyper("checkpoint", "verify", str(path)), capture_output=True, text=True)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_newest_intact(base, fault):
    name, damage, what = FAULTS[fault]
    out = copy_of(base, fault)
    newest = out / "checkpoints" / "step_6"
    if fault == "flipped-byte":  # silent without the manifest: torch loads it, one weight is different
        import torch

        before = torch.load(newest / MODEL, map_location="cpu", weights_only=True)["module"]
        damage(newest / name)
        after = torch.load(newest / MODEL, map_location="cpu", weights_only=True)["module"]
        assert sum(not before[k].equal(after[k]) for k in before) == 1
    else:
        damage(newest / name)
    damaged_bytes = {p.name: p.read_bytes() for p in newest.iterdir()}

    check = verify_cli(out)
    assert check.returncode == 1, check.stdout + check.stderr
    assert re.search(rf"step_6\s+damaged\s+{what}", check.stdout), check.stdout
    assert re.search(r"step_4\s+intact\s+5 files", check.stdout) and re.search(r"step_2\s+intact", check.stdout)

    results = run_ranks(train_cmd(base["wd"], out), 2, base["wd"])  # the same command: train.resume=auto
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    log0, log1 = results[0].stdout, results[1].stdout
    warnings = [line for line in log0.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "is damaged" not in log1, warnings
    assert re.search(rf"warning: checkpoint {newest} is damaged: {what}.* — resuming from {out}/checkpoints/step_4 "
                     r"instead; the damaged directory is kept as step_6\.damaged$", warnings[0]), warnings[0]  # fmt: skip
    assert f"resumed from {out}/checkpoints/step_4 at step 4" in log0

    kept = out / "checkpoints" / "step_6.damaged"  # set aside exactly as it was found
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged_bytes
    assert manifest.verify(newest).status == manifest.INTACT  # the new step_6, written by the resumed run
    assert losses(out) == base["losses"] + base["losses"][4:]  # steps 5 and 6 again, identical
    again = weights(newest)
    assert again.keys() == base["weights"].keys() and all(again[k].equal(base["weights"][k]) for k in again)


def test_an_explicit_damaged_checkpoint_is_refused_by_train_and_every_reader(base, capsys):
    from scale_hyper.engine import checkpointer, export, init_from
    from scale_hyper.evaluation import mlm

    out = copy_of(base, "explicit")
    newest = out / "checkpoints" / "step_6"
    (newest / OPTIM.format(0)).write_bytes((newest / OPTIM.format(0)).read_bytes()[:1000])
    what = re.escape(OPTIM.format(0)) + r" is 1,000 bytes, the manifest says [\d,]+"

    # One process (the verdict is all-gathered, so 2 ranks refuse alike: the auto cases show they agree).
    refused = subprocess.run(train_cmd(base["wd"], out, f"train.resume={newest}"), capture_output=True, text=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("scale-hyper: error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert re.search(rf"train\.resume={newest}: checkpoint {newest} is damaged: {what} — resume from an intact "
                     r"one \(train\.resume=auto", errors[0]), errors[0]  # fmt: skip
    assert newest.is_dir() and not (out / "checkpoints" / "step_6.damaged").exists()  # a refusal changes nothing

    # The readers: a damaged checkpoint named explicitly is refused; a run directory gives its newest intact one.
    assert export.main(str(newest), str(out / "hf-refused")) == 2
    assert re.search(f"error: checkpoint {newest} is damaged: {what}", capsys.readouterr().err)
    assert not (out / "hf-refused").exists()
    assert export.main(str(out), str(out / "hf")) == 0
    captured = capsys.readouterr()
    assert f"exported {out}/checkpoints/step_4 ->" in captured.out
    assert re.search(f"warning: checkpoint {newest} is damaged: {what} — using {out}/checkpoints/step_4", captured.err)
    assert checkpointer.main("universal", str(newest), None) == 2
    assert "is damaged" in capsys.readouterr().err and not (out / "checkpoints" / "step_6_universal").exists()
    with pytest.raises(manifest.DamagedCheckpointError, match=what):
        mlm.evaluate(str(newest))
    assert runs.resolve(out).path == out / "checkpoints" / "step_4"
    assert runs.resolve(newest, verify="off").path == newest  # train.verify_checkpoint=off: unchecked
    with pytest.raises(ValueError, match=f"train.init_from='{newest}': checkpoint {newest} is damaged"):
        from scale_hyper.config import load_config

        init_from.adopt_geometry(load_config([f"train.init_from={newest}"]))


def test_a_checkpoint_saved_before_manifests_still_resumes_exactly_with_one_warning(base):
    """What the current main writes: no manifest.json, a marker without its record. Unverifiable: loaded,
    said once. (A run interrupted after step_4: step_6 is gone.)"""
    out = copy_of(base, "pre-manifest")
    shutil.rmtree(out / "checkpoints" / "step_6")
    ckpt = out / "checkpoints" / "step_4"
    (ckpt / "manifest.json").unlink()
    state = runs.read_state(ckpt)
    del state["manifest"], state[manifest.SEAL]
    (ckpt / runs.MARKER).write_text(json.dumps(state))
    check = verify_cli(out)
    assert check.returncode == 0 and re.search(
        r"step_4\s+unverifiable\s+saved before checkpoint manifests", check.stdout
    )

    results = run_ranks(train_cmd(base["wd"], out), 2, base["wd"])
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    warnings = [line for line in results[0].stdout.splitlines() if "warning: checkpoint" in line]
    assert warnings == [f"[scale-hyper] warning: checkpoint {ckpt} has no manifest (saved before scale-hyper "
                        "wrote them): loading it unverified"]  # fmt: skip
    assert f"resumed from {ckpt} at step 4" in results[0].stdout
    assert losses(out) == base["losses"] + base["losses"][4:]
    again = weights(out / "checkpoints" / "step_6")
    assert all(again[k].equal(base["weights"][k]) for k in base["weights"])


def test_marker_and_manifest_are_checked_too(base, tmp_path):
    from test_cli_imports import assert_light, imported

    out = copy_of(base, "marker")
    ckpt = out / "checkpoints" / "step_4"
    modules, printed = imported(tmp_path, "checkpoint", "verify", str(ckpt))  # no torch, DeepSpeed, MLflow
    assert_light(modules)
    assert re.search(r"step_4\s+intact", printed), printed
    assert manifest.verify(ckpt).status == manifest.INTACT
    state = json.loads((ckpt / runs.MARKER).read_text())
    state["step"] = 5  # still valid JSON, another value
    (ckpt / runs.MARKER).write_text(json.dumps(state))
    verdict = manifest.verify(ckpt, "sizes")
    assert not verdict.usable and "trainer_state.json does not match its own xxh3_64 checksum" in verdict.problems[0]
    (out / "checkpoints" / "step_2" / "manifest.json").write_text("{}")
    assert "manifest.json has xxh3_64" in manifest.verify(out / "checkpoints" / "step_2", "sizes").what()
    assert manifest.verify(ckpt, "off").status == manifest.UNCHECKED


def test_rotation_never_deletes_the_newest_intact_checkpoint_while_newer_ones_are_damaged(base):
    """Rotation spares the newest intact checkpoint; the line a hung rank prints names it (sizes only)."""
    out = copy_of(base, "rotation")
    ckpts = runs.RunDir(out).complete_checkpoints()  # step_2, step_4, step_6
    assert manifest.prunable(ckpts, keep=1) == ckpts[:2]  # all intact: plain rotation
    assert manifest.newest_sized(out / "checkpoints") == ckpts[2]
    (ckpts[2] / OPTIM.format(1)).unlink()
    assert manifest.prunable(ckpts, keep=2) == ckpts[:1]  # step_4 is kept anyway
    assert manifest.prunable(ckpts, keep=1) == ckpts[:1]  # step_6 damaged: step_4 is spared
    assert manifest.newest_sized(out / "checkpoints") == ckpts[1]
    (ckpts[1] / MODEL).write_bytes(b"x")
    assert manifest.prunable(ckpts, keep=1) == ckpts[1:2]  # both newer damaged: step_2 is spared
    assert manifest.newest_sized(out / "checkpoints") == ckpts[0]
    flip_a_byte(ckpts[0] / MODEL)  # same size: only a full check sees it, the hang line does not read files
    assert manifest.newest_sized(out / "checkpoints") == ckpts[0]


@pytest.mark.slurm
def test_a_slurm_requeue_after_the_newest_checkpoint_was_damaged_completes(submit, shards, tmp_path):  # noqa: F811
    """SIGUSR1 (what --signal=B:USR1@120 sends before the time limit) -> checkpoint at step k -> requeue.
    Between the save and the restart the newest checkpoint is truncated, as a quota hit would leave it:
    the requeued job names it, resumes from the previous one and completes."""
    steps = 24
    env = job_env(tmp_path, shards, "damaged", PREFLIGHT="0", SCALE_HYPER_TEST_STEP_SECONDS="0.2")
    args = [*TRAIN, f"train.max_steps={steps}", "train.save_every=4", "train.stop_check_every=1",
            "train.keep_checkpoints=3"]  # fmt: skip
    job = submit("single-node.sbatch", "damaged", ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], env, args)
    job.wait_for(r"checkpoint saved: \S+/step_8\b", timeout=300)
    assert run(["scancel", "--signal=USR1", "--batch", job.id]).returncode == 0
    deadline, stopped = time.monotonic() + 120, None
    while stopped is None and time.monotonic() < deadline:  # polled fast: the requeue follows within seconds
        stopped = re.search(r"stopped by SIGUSR1: checkpoint saved at step (\d+)", job.text())
        time.sleep(0.1)
    assert stopped, job.text()[-8000:]
    k = int(stopped.group(1))
    victim = tmp_path / "runs" / "damaged" / "checkpoints" / f"step_{k}" / OPTIM.format(0)
    victim.write_bytes(victim.read_bytes()[:1000])  # the requeued job is seconds away from reading it
    info = job.wait(300, restarts=1)
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-8000:]
    assert "requeueing job" in text
    warning = re.search(rf"warning: checkpoint \S+/step_{k} is damaged: {re.escape(OPTIM.format(0))} is 1,000 bytes"
                        r".* resuming from \S+/step_(\d+) instead", text)  # fmt: skip
    assert warning, text[-8000:]
    previous = int(warning.group(1))
    assert (
        previous < k and previous % 4 == 0 and re.search(rf"resumed from \S+step_{previous} at step {previous}\b", text)
    )
    assert re.search(rf"steps\s+{steps}\b", text) and text.count("training finished") == 1
    assert (victim.parent.parent / f"step_{k}.damaged" / OPTIM.format(0)).stat().st_size == 1000
