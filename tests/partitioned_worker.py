"""One rank of tests/test_partitioned.py (launched on 2 CPU ranks): the model built partitioned under
ZeRO-3 through the trainer's own phases (``setup.build_model`` → ``start_deepspeed`` →
``keep_shared_resident``), against the whole build and against ZeRO-0.

Records, per rank, in the JSON file named on the command line:
* build: the peak of parameter elements materialised at once while building (sampled at every
  parameter registration), whole vs partitioned; the gathered weights of the partitioned build
  against the whole build from the same seed (fp32 and bf16); the shared modules' state after build.
* train: per-step losses of ZeRO-0 and of ZeRO-3 variants (partitioned; + CPU offload of optimizer
  and parameters + activation checkpointing; + NVMe offload; built whole), the steady-state count of
  all-gathers of the shared modules and of the blocks, and a save → resume round trip.
* init_from: a Hugging Face export loaded into a partitioned model, and one of another geometry.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from zero_worker import batch, count_gathers

from scale_hyper.config import ConfigError, load_config
from scale_hyper.engine import setup
from scale_hyper.engine.distributed import init_distributed
from scale_hyper.launch.leave import leave_now

STEPS, SAVE_AT = 5, 3
BASE = [
    "model.vocab_size=512", "model.dropout=0.0", "model.num_layers=3", "deepspeed.precision=fp32",
    "train.micro_batch_size=4", "train.global_batch_size=0", f"train.max_steps={STEPS}", "train.warmup_ratio=0",
    "deepspeed.param_persistence_threshold=0",
]  # fmt: skip
Z3 = ["deepspeed.zero_stage=3"]
OFFLOAD = Z3 + ["deepspeed.offload_optimizer=true", "deepspeed.offload_param=true",
                "train.activation_checkpointing=non_reentrant"]  # fmt: skip


def config(*extra: str):
    return load_config([*BASE, *extra])


def peak_while(build) -> tuple:
    """(model, the most parameter elements materialised at once while ``build()`` ran)."""
    live: list = []
    peak = [0]

    def hook(module, name, param):
        if param is not None:
            live.append(weakref.ref(param))
            held = (p.data for r in live if (p := r()) is not None)
            peak[0] = max(peak[0], sum(t.numel() for t in held if not t.is_meta))  # meta: the fit check's count

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        model = build()
    finally:
        handle.remove()
    return model, peak[0]


def gathered_state(model) -> dict:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id") and not p.ds_persist):
            out[name] = p.data.detach().clone().float()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[k] - b[k].float()).abs().max()) for k in a)


def shared_of(model) -> list:
    return [p for m in model.shared_modules() for p in m.parameters()]


def check_build(info, extra=()) -> dict:
    run_whole = config(*extra)  # ZeRO-1 (the default): built whole, as before
    run_part = config(*Z3, *extra)
    whole, whole_peak = peak_while(lambda: setup.build_model(run_whole, info, None))
    part, part_peak = peak_while(lambda: setup.build_model(run_part, info, None))
    world = info.world_size
    shared = shared_of(part)
    split = [p for p in part.parameters() if not p.ds_persist]
    return {
        "total": sum(p.numel() for p in whole.parameters()),
        "whole_peak": whole_peak,
        "partitioned_peak": part_peak,
        "shared_numel": sum(p.ds_numel for p in shared),
        "largest_module": max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in part.modules()),
        "max_diff": max_diff(gathered_state(part), {k: v for k, v in whole.state_dict().items()}),
        "shared_whole_after_build": all(p.ds_persist and p.data.numel() == p.ds_numel for p in shared),
        "others_split_after_build": all(
            p.data.numel() == 0 and p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for p in split
        ),
    }


def check_bf16(info) -> dict:
    """bf16: zero.Init creates parameters in bf16 and initialises them there; the whole build draws fp32."""
    whole = setup.build_model(config("deepspeed.precision=bf16"), info, None)
    part = setup.build_model(config(*Z3, "deepspeed.precision=bf16"), info, None)
    ref = {k: v.to(torch.bfloat16).float() for k, v in whole.state_dict().items()}
    got = gathered_state(part)
    return {"max_diff": max_diff(got, ref), "dtype": str(next(p for p in part.parameters()).dtype)}


def mean_step_loss(engine, step: int, info) -> float:
    """One optimizer step on this rank's batch; the loss averaged over the ranks."""
    loss = engine(**batch(step, info.rank), sparse_logits=True).loss
    engine.backward(loss)
    engine.step()
    t = loss.detach().clone()
    torch.distributed.all_reduce(t)
    return t.item() / info.world_size


def train(info, run, tmp: Path, name: str, resume_check: bool = False) -> dict:
    model = setup.build_model(run, info, None)
    engine, _ = setup.start_deepspeed(run, info, model, None)
    resident = setup.keep_shared_resident(run, engine, model)
    counts: dict = {}
    if engine.zero_optimization_stage() == 3:
        count_gathers(model, counts)
    shared_names = {n for n, p in model.named_parameters() if any(p is q for q in shared_of(model))}
    losses, saved = [], None
    for step in range(STEPS):
        if step == 1:  # the first step records DeepSpeed's fetch trace and releases everything: steady from 1 on
            counts.clear()
        if resume_check and step == SAVE_AT:
            engine.save_checkpoint(str(tmp / name), tag="mid")
            saved = gathered_state(model)
        losses.append(mean_step_loss(engine, step, info))
    out = {
        "losses": losses, "resident": len(resident), "shared": len(shared_names),
        "shared_gathers": sum(v for k, v in counts.items() if k in shared_names),
        "block_gathers": sum(v for k, v in counts.items() if ".layers." in k),
    }  # fmt: skip
    if resume_check:
        again = setup.build_model(run, info, None)
        engine2, _ = setup.start_deepspeed(run, info, again, None)
        setup.keep_shared_resident(run, engine2, again)
        engine2.load_checkpoint(str(tmp / name), tag="mid")
        out["resumed_losses"] = [mean_step_loss(engine2, step, info) for step in range(SAVE_AT, STEPS)]
        if info.rank == 0:  # zero_to_fp32 on the saved checkpoint = the weights held at the save
            from scale_hyper import runs

            consolidated = runs.consolidated_state_dict(tmp / name / "mid")
            out["zero_to_fp32_max_diff"] = max_diff(saved, consolidated)
    return out


def check_init_from(info, tmp: Path) -> dict:
    source = setup.build_model(config("model.num_layers=3", "train.seed=7"), info, None)
    export = tmp / "export"
    if info.rank == 0:
        source.save_pretrained(export, safe_serialization=True)
    torch.distributed.barrier()
    run = config(*Z3, f"train.init_from={export}")
    model = setup.build_model(run, info, None)
    out = {"max_diff": max_diff(gathered_state(model), dict(source.state_dict()))}
    try:
        setup.build_model(config(*Z3, "model.num_layers=2", f"train.init_from={export}"), info, None)
        out["other_geometry"] = "accepted"
    except ValueError as err:
        out["other_geometry"] = str(err)
    return out


def main(out_path: str) -> None:
    info = init_distributed("cpu", timeout_minutes=5)
    results: dict = {"world": info.world_size}
    results["build"] = check_build(info)
    results["build_shared_mixers"] = check_build(info, ("model.mixer=bert", "model.share_mixers=2"))
    results["bf16"] = check_bf16(info)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        box = [d]
        torch.distributed.broadcast_object_list(box, src=0)  # one directory for both ranks (rank 0's)
        tmp = Path(box[0])
        results["zero0"] = train(info, config(), tmp, "zero0")
        results["z3"] = train(info, config(*Z3), tmp, "z3", resume_check=True)
        results["z3_whole_build"] = train(info, config(*Z3, "deepspeed.zero_init=false"), tmp, "z3w")
        results["z3_offload"] = train(info, config(*OFFLOAD), tmp, "z3o")
        nvme = tmp / "nvme"
        nvme.mkdir(exist_ok=True)
        try:
            results["z3_nvme"] = train(
                info, config(*OFFLOAD, "deepspeed.offload_device=nvme", f"deepspeed.nvme_path={nvme}"), tmp, "z3n"
            )
        except ConfigError as err:  # async_io cannot be built here: the one line is the result
            results["z3_nvme"] = {"refused": str(err)}
        results["init_from"] = check_init_from(info, tmp)
        torch.distributed.barrier()
    every: list = [None] * info.world_size
    torch.distributed.all_gather_object(every, results)
    if info.rank == 0:
        Path(out_path).write_text(json.dumps(every))
    torch.distributed.barrier()
    leave_now(0)  # several engines' gloo threads can abort the interpreter's teardown (seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
