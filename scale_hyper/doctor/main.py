"""`scale-hyper doctor [CONFIG ...] [key=value ...] [--json PATH] [--checks a,b]`.

Launched exactly like `train` (one process, torchrun, deepspeed, srun). Bad input (an unknown check,
a world size the config's batch cannot be split over, an output directory on a full disk) fails
before anything runs: one line, exit 2. Then every rank checks in at a rendezvous with a short
timeout (``--join-timeout``), forms a process group (NCCL on GPUs, gloo on CPU) and runs the checks;
rank 0 prints one table and writes the same as JSON. Exit 0 when nothing FAILed, 1 otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.config.batch import global_batch, split_batch
from scale_hyper.doctor import collectives, environment, kernels, storage, training
from scale_hyper.doctor.results import CHECKS, FAIL, SKIPPED, Result, format_table, overall
from scale_hyper.launch import free_port, map_launcher_env, pick_device

STORAGE_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}


def select(checks: Optional[str]) -> List[str]:
    if not checks:
        return list(CHECKS)
    names = [c.strip() for c in checks.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown check {', '.join(repr(c) for c in unknown)} — choose from {','.join(CHECKS)}")
    if "resume" in names and "training" not in names:
        names.append("training")  # the resume continues the training check's run
    return [c for c in CHECKS if c in names]


def check_world_split(run: RunConfig, world: int) -> None:
    """The batch split the trainer will apply (``config.batch``: global = micro × accumulation × world)."""
    t = run.train
    split_batch(global_batch(t.global_batch_size, t.micro_batch_size, world), t.micro_batch_size, world)


def _precision(run: RunConfig, device: torch.device) -> str:
    choice = run.deepspeed.precision
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _gather(obj: Any, world: int) -> List[Any]:
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _note(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[scale-hyper doctor] {message}", flush=True)


def _emit(results: List[Result], world: int, configs: List[str], json_path: Optional[str], started: float) -> int:
    verdict = overall(results)
    failed = [r.check for r in results if r.status == FAIL]
    print(f"\n=== scale-hyper doctor: {world} rank(s), {time.perf_counter() - started:.0f} s ===", flush=True)
    print(format_table(results), flush=True)
    print(f"doctor: {verdict}" + (f" ({len(failed)} failed: {', '.join(failed)})" if failed else ""), flush=True)
    if json_path:
        report = {
            "overall": verdict, "world_size": world, "configs": configs,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1), "results": [r.to_dict() for r in results],
        }  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"doctor: JSON written to {json_path}", flush=True)
    return 0 if verdict != FAIL else 1


def _guarded(name: str, fn, *args: Any) -> Any:
    """A check that raises becomes one FAIL row (rank-local checks only: collectives must not diverge)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - the doctor reports, it does not crash
        return Result(
            name, FAIL, "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        )


def main(run: RunConfig, configs: List[str], checks: Optional[str] = None, json_path: Optional[str] = None,
         steps: int = 8, join_timeout: float = 90.0) -> int:  # fmt: skip
    started = time.perf_counter()
    selected = select(checks)
    if steps < 4:
        raise ConfigError(f"--steps {steps}: the training check needs at least 4 steps — pass --steps 4 or more")
    map_launcher_env()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    check_world_split(run, world)
    if {"storage", "training"} & set(selected):
        storage.require_room(run)
    device = pick_device(run.train.device, local)
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        rv = collectives.Rendezvous(addr, port, rank, world, join_timeout)
        missing = rv.join(environment.node_id())
    except (RuntimeError, dist.DistError) as err:
        print(f"scale-hyper doctor: rank {rank}: FAIL collectives/rendezvous: rank 0's store at {addr}:{port} did not "
              f"answer within {join_timeout:.0f} s (rank 0 never joined, or MASTER_ADDR/MASTER_PORT is wrong for this "
              f"node): {str(err).splitlines()[0][:200]}", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    if missing:
        if rank == 0:
            return _emit([collectives.not_joined(missing, world, join_timeout, rv.address, rv.nodes())], world,
                         configs, json_path, started)  # fmt: skip
        return 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("doctor/pg/", rv.store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=run.train.dist_timeout_minutes))  # fmt: skip
    try:
        results = _run_checks(run, configs, selected, rank, world, device, rv, steps)
        code = _emit(results, world, configs, json_path, started) if rank == 0 else None
        return _gather(code, world)[0]  # every rank exits like rank 0 (launchers treat a lone failure as a crash)
    finally:
        dist.destroy_process_group()


def _run_checks(run: RunConfig, configs: List[str], selected: List[str], rank: int, world: int,
                device: torch.device, rv: collectives.Rendezvous, steps: int) -> List[Result]:  # fmt: skip
    results: List[Result] = [Result("collectives/rendezvous", "PASS", f"{world}/{world} joined",
                                    f"every rank checked in at {rv.address}")]  # fmt: skip
    nodes = rv.nodes()
    if "environment" in selected:
        _note(rank, "environment")
        try:
            info = environment.collect(run, device, rank)
        except Exception as err:  # noqa: BLE001 - a broken install on one rank must not hang the others
            info = {"rank": rank, "node": environment.node_id(), "error": f"{type(err).__name__}: {err}"[:300]}
        infos = _gather(info, world)
        results.append(_guarded("environment", environment.check, run, infos))
    if "collectives" in selected:
        _note(rank, "collectives")
        results += collectives.check(device, rank, world, nodes)
    if "kernels" in selected:
        _note(rank, "kernels")
        rows = _gather(_guarded("kernels", kernels.check_triton, run, device), world)
        bad = [(r, row) for r, row in enumerate(rows) if row.status == FAIL]
        if bad:  # rank-local: name the ranks where it failed
            first = bad[0][1]
            ranks = ", ".join(str(r) for r, _ in bad)
            results.append(Result(first.check, FAIL, first.figure, f"rank {ranks}: {first.detail}", first.data))
        else:
            results.append(rows[0])
    if "sdpa" in selected:
        _note(rank, "sdpa")
        results.append(_guarded("sdpa", kernels.check_sdpa, run, device, _precision(run, device)))
    if "storage" in selected:
        _note(rank, "storage")
        size = STORAGE_BYTES[device.type]
        per_rank = _gather(storage.measure(run, rank, size), world)
        results += storage.check(run, per_rank)
    if "training" in selected:
        results += _training(run, configs, selected, rank, world, device, steps)
    return results


def _training(run: RunConfig, configs: List[str], selected: List[str], rank: int, world: int, device: torch.device,
              steps: int) -> List[Result]:  # fmt: skip
    home = training.doctor_dir(run)
    writable = True
    if rank == 0:
        shutil.rmtree(home / "a", ignore_errors=True)
        shutil.rmtree(home / "b", ignore_errors=True)
        try:
            (home / "logs").mkdir(parents=True, exist_ok=True)
        except OSError:
            writable = False
    writable = _gather(writable, world)[0]
    if not writable:
        reason = f"train.output_dir={run.train.output_dir} is not writable (see storage)"
        return [Result("training", SKIPPED, "", reason)] + ([Result("resume", SKIPPED, "", reason)]
                                                             if "resume" in selected else [])  # fmt: skip
    timeout_s = 60 * run.train.dist_timeout_minutes + 600
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the collectives' and kernels' buffers: the trainer shares this GPU

    def trainer(name: str, resume: str) -> List[Any]:
        port = _gather(free_port() if rank == 0 else None, world)[0]
        _note(rank, f"training ({name}): `scale-hyper train` on {world} rank(s), port {port}")
        return _gather(training.launch(run, configs, name, steps, resume, port, timeout_s), world)

    runs_a = trainer("a", "none")
    results = training.check_training(run, runs_a, device, world) if rank == 0 else []
    if "resume" in selected:
        if any(r["exit"] != 0 for r in runs_a):
            results.append(Result("resume", SKIPPED, "", "the training check's run failed: nothing to resume"))
        else:
            ckpt = training.doctor_dir(run) / "a" / "checkpoints" / f"step_{max(1, steps // 2)}"
            runs_b = trainer("b", str(ckpt))
            if rank == 0:
                results.append(training.check_resume(run, runs_b, steps, device))
    dist.barrier()
    if rank == 0 and not os.environ.get("SCALE_HYPER_DOCTOR_KEEP"):
        shutil.rmtree(home / "a", ignore_errors=True)
        shutil.rmtree(home / "b", ignore_errors=True)
    return results
