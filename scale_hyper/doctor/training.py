"""A few steps of the real trainer, then a save and a resume.

Every doctor rank starts one `scale-hyper train` process (through ``probe``) with the same RANK,
LOCAL_RANK, WORLD_SIZE and MASTER_ADDR as itself and a fresh MASTER_PORT chosen by rank 0, so the
trainer forms its own process group exactly as a real launch does, on one node or many. Run A trains
``steps`` steps from scratch and saves half-way and at the end; run B resumes from A's half-way
checkpoint and trains to the end: its losses and data cursors must equal A's (bit-exact on CPU).
Both write under ``{train.output_dir}/doctor/``, which is removed afterwards.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from scale_hyper import runs
from scale_hyper.config import RunConfig
from scale_hyper.doctor.results import FAIL, PASS, SKIPPED, Result
from scale_hyper.runs import manifest
from scale_hyper.runs.disk import human_bytes

STEADY_FROM = 2  # optimizer steps done before residency is measured (probe.py says why)


def doctor_dir(run: RunConfig) -> Path:
    return Path(run.train.output_dir).absolute() / "doctor"


def overrides(run: RunConfig, name: str, steps: int, resume: str) -> List[str]:
    out = doctor_dir(run) / name
    return [
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.save_every={max(1, steps // 2)}",
        "train.keep_checkpoints=0", "train.log_every=1", f"train.eval_every={10 * steps}", "train.eval_batches=1",
        "train.export=false", "train.stop_after_steps=0", "tracking.enabled=false", f"train.resume={resume}",
    ]  # fmt: skip


def launch(run: RunConfig, configs: List[str], name: str, steps: int, resume: str, port: int,
           timeout_s: float) -> Dict[str, Any]:  # fmt: skip
    """This rank's trainer process; returns its exit code, the probe's record and the log's tail."""
    logs = doctor_dir(run) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rank = os.environ["RANK"]
    probe_out, log = logs / f"{name}.rank{rank}.json", logs / f"{name}.rank{rank}.log"
    probe_out.unlink(missing_ok=True)
    env = dict(os.environ, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # torchrun's agent hosts the doctor's store, not the trainer's
    env.pop("SCALE_HYPER_APPEND", None)  # already in ``configs``; appended again it would override the steps below
    cmd = [sys.executable, "-m", "scale_hyper.doctor.probe", str(probe_out), "train", *configs,
           *overrides(run, name, steps, resume)]  # fmt: skip
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -1
    text = log.read_text(errors="replace")
    record = json.loads(probe_out.read_text()) if probe_out.exists() else {}
    errors = [line for line in text.splitlines() if line.startswith("scale-hyper: ")]
    cause = errors[-1] if errors else (text.strip().splitlines() or ["(no output)"])[-1]
    if code == -1:
        cause = f"timed out after {timeout_s:.0f} s"
    return {"rank": int(rank), "exit": code, "probe": record, "cause": cause[:400], "log": str(log)}


def _metrics(name: str, run: RunConfig) -> List[Dict[str, Any]]:
    path = runs.RunDir(doctor_dir(run) / name).metrics
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def _failed(per_rank: List[Dict[str, Any]]) -> Optional[str]:
    bad = [r for r in per_rank if r["exit"] != 0]
    if not bad:
        return None
    return "; ".join(f"rank {r['rank']} exited {r['exit']}: {r['cause']} (log {r['log']})" for r in bad[:3])


def planned_peak_memory(run: RunConfig, world: int) -> Optional[int]:
    """Hook for the launch issue's `plan` (#12): its predicted peak memory per rank, to compare with the
    measured one. The planner lives in ``engine/planner.py``, which ``doctor`` (an ``engine`` sibling)
    may not import; once its memory arithmetic moves a layer down (models/ or config/), call it here.
    Until then: None, and the row shows the measured figure only."""
    return None


def check_training(run: RunConfig, per_rank: List[Dict[str, Any]], device: torch.device, world: int) -> List[Result]:
    rows = _metrics("a", run)
    failed = _failed(per_rank)
    if failed:
        return [Result("training", FAIL, "trainer failed", failed, {"ranks": per_rank})]
    if not rows:
        return [Result("training", FAIL, "no metrics", "the trainer wrote no metrics.jsonl", {"ranks": per_rank})]
    losses = {int(r["step"]): float(r["loss"]) for r in rows}
    steps = sorted(losses)
    nonfinite = [s for s in steps if not math.isfinite(losses[s])]
    skipped, seen = [], 0.0
    for r in rows:  # skipped_steps is cumulative: a step that raised it was refused (non-finite gradients)
        if r.get("skipped_steps", 0.0) > seen:
            skipped.append(int(r["step"]))
            seen = r["skipped_steps"]
    first, last = losses[steps[0]], statistics.mean(losses[s] for s in steps[-2:])
    figure = f"loss {first:.3f} → {losses[steps[-1]]:.3f}"
    data = {"losses": losses, "skipped": skipped, "ranks": per_rank}
    results = []
    if nonfinite or skipped:
        where = sorted(set(nonfinite) | set(skipped))
        results.append(Result("training", FAIL, figure, f"non-finite loss: optimizer step(s) {', '.join(map(str, where))} "
                              "had a non-finite loss or gradients and were refused (check deepspeed.precision, "
                              "train.lr, the data)", data))  # fmt: skip
    elif not last < first:
        results.append(Result("training", FAIL, figure, f"the loss did not fall over {len(steps)} steps "
                              f"({first:.4f} → mean of the last two {last:.4f}); check train.lr and the data", data))  # fmt: skip
    else:
        results.append(Result("training", PASS, figure, f"{len(steps)} steps, loss finite and falling "
                              f"(first {first:.4f}, mean of the last two {last:.4f})", data))  # fmt: skip
    probes = [r["probe"] for r in per_rank]
    p0 = probes[0]
    stage, shared = p0.get("zero_stage"), p0.get("shared_params", 0)
    if stage != 3:
        results.append(Result("training/residency", SKIPPED, "", f"ZeRO-{stage}: every rank holds all weights "
                              "(residency matters under deepspeed.zero_stage=3)"))  # fmt: skip
    elif not shared:
        results.append(
            Result("training/residency", SKIPPED, "", f"model.mixer={run.model.mixer} has no shared modules")
        )
    elif not run.deepspeed.hypernet_resident:
        results.append(Result("training/residency", SKIPPED, "", "deepspeed.hypernet_resident=false: the "
                              "hypernetwork is partitioned on purpose"))  # fmt: skip
    else:

        def steady(p: Dict[str, Any], kind: str) -> int:  # from the third optimizer step on (see probe)
            return sum(n for k, n in p["gathers"][kind].items() if int(k) >= STEADY_FROM)

        gathers = {p["rank"]: steady(p, "shared") for p in probes}
        counted = max(0, p0.get("optimizer_steps", 0) - STEADY_FROM)
        others = sum(steady(p, "other") for p in probes)
        layers = p0.get("layers") or run.model.num_layers
        figure = f"{sum(gathers.values())} gathers"
        detail = (f"ZeRO-3, {shared} shared tensors ({p0.get('shared_numel', 0):,} parameters) of the hypernetwork; "
                  f"all-gathers of them in steps {STEADY_FROM + 1}–{p0.get('optimizer_steps')} ({counted} steps × "
                  f"{layers} layers): {gathers} by rank; of the other parameters: {others} (all ranks)")  # fmt: skip
        if others == 0:
            detail += (f"; note: no other parameter was gathered either (all under deepspeed.param_persistence_"
                       f"threshold={run.deepspeed.param_persistence_threshold}), so this model is too small to tell "
                       "residency from that threshold")  # fmt: skip
        not_resident = [p["rank"] for p in probes if not p.get("resident_at_end", True)]
        if any(gathers.values()) or not_resident:
            results.append(Result("training/residency", FAIL, figure, "the hypernetwork is not resident: it is "
                                  f"all-gathered per layer ({detail}); rank(s) not persistent: {not_resident}", data={}))  # fmt: skip
        else:
            results.append(Result("training/residency", PASS, figure, "resident, 0 per-layer gathers: " + detail))
    tokens = [float(r["tokens_per_s"]) for r in rows[2:] or rows]
    tok_s = statistics.median(tokens)
    mfus = [float(r["mfu"]) for r in rows[2:] if "mfu" in r]
    peak = max(int(p.get("peak_memory_bytes", 0)) for p in probes)
    planned = planned_peak_memory(run, world)
    mfu = f"MFU {statistics.median(mfus) * 100:.1f} %" if mfus else "MFU n/a (no peak FLOP/s known for this device)"
    detail = (f"median over steps 3+: {tok_s:,.0f} tokens/s over {world} rank(s), {mfu}; peak memory "
              f"{human_bytes(peak)} ({p0.get('memory_kind', '?')}, the largest rank)")  # fmt: skip
    detail += f", plan: {human_bytes(planned)}" if planned else ", plan: n/a (not reachable from doctor yet)"
    results.append(Result("training/throughput", PASS, f"{tok_s:,.0f} tok/s",
                          detail, {"tokens_per_s": tok_s, "mfu": mfus, "peak_memory_bytes": peak}))  # fmt: skip
    return results


def check_resume(run: RunConfig, per_rank: List[Dict[str, Any]], steps: int, device: torch.device) -> Result:
    failed = _failed(per_rank)
    if failed:
        return Result("resume", FAIL, "trainer failed", f"resuming from the half-way checkpoint failed: {failed}")
    half = max(1, steps // 2)
    a = {int(r["step"]): float(r["loss"]) for r in _metrics("a", run)}
    b = {int(r["step"]): float(r["loss"]) for r in _metrics("b", run)}
    expected = list(range(half + 1, steps + 1))
    if sorted(b) != expected:
        return Result("resume", FAIL, "wrong steps", f"the resumed run logged steps {sorted(b)}, expected {expected}")
    diffs = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) if math.isfinite(a[s]) else 0.0 for s in expected]
    worst = max(diffs, default=0.0)
    tol = 0.0 if device.type == "cpu" else 5e-3  # GPU kernels are not all deterministic
    problems = []
    if worst > tol:
        bad = [s for s, d in zip(expected, diffs, strict=True) if d > tol]
        problems.append(f"losses after the resume differ from the uninterrupted run at step(s) {bad} "
                        f"(largest relative difference {worst:.2e}, tolerance {tol:g})")  # fmt: skip
    end_a, end_b = (runs.RunDir(doctor_dir(run) / n).step(steps) for n in ("a", "b"))
    try:
        cursors_a, cursors_b = (runs.read_state(c).get("data_cursors") for c in (end_a, end_b))
        if cursors_a != cursors_b:
            problems.append("the data cursors at the end differ from the uninterrupted run's")
    except OSError as err:
        problems.append(f"a final checkpoint is missing: {err}")
    for ckpt in (runs.RunDir(doctor_dir(run) / "a").step(half), end_a, end_b):  # what this storage kept
        verdict = manifest.verify(ckpt, "full")
        if verdict.status != manifest.INTACT and ckpt.is_dir():
            problems.append(f"checkpoint {ckpt} does not match its manifest ({verdict.status}: {verdict.what()}): "
                            "the storage under train.output_dir did not keep what was written")  # fmt: skip
    figure = "equal" if worst == 0 else f"max rel diff {worst:.1e}"
    detail = (f"saved at step {half}, verified against its manifest, resumed into a new run directory and trained to "
              f"step {steps}: losses of steps {half + 1}–{steps} and the data cursors at the end against the uninterrupted run "
              f"({'bit-exact on CPU' if tol == 0 else f'relative tolerance {tol:g} on GPU'})")  # fmt: skip
    if problems:
        return Result("resume", FAIL, figure, "; ".join(problems) + ". " + detail, {"a": a, "b": b})
    return Result("resume", PASS, figure, detail, {"a": a, "b": b})
