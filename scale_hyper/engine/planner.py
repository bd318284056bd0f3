"""`scale-hyper plan`: what a run needs per GPU before it is queued.

For a world size and a GPU: the micro-batch/accumulation split (``config.batch.split_batch``), per-GPU
memory by ZeRO stage 0–3, the largest micro batch that fits, tokens per step, step time and days to the
run's budget (``train.max_steps`` × global batch × seq_len tokens) at a stated MFU.

The arithmetic is ``models/memory.py`` (shared with the trainer's fit check and the doctor): model
state (weights, gradients, fp32 master copy, Adam moments) follows DeepSpeed 0.19.8's partitioning
parameter by parameter; ZeRO-3 also holds gathered weights during forward and backward (a model
below DeepSpeed's reuse window, 1e9 elements, is whole from forward through backward). The fp32
figures are checked against the bytes CPU ranks really hold (``tests/test_plan.py``,
``tests/plan_worker.py``) and against peak host memory (docs/benchmarks.md, "Models past one device");
bf16 adds DeepSpeed's fp32 master partition to 16-bit weights and gradients, as in the ZeRO paper, and
is not measured here (no GPU). Activations are analytic and labelled so (Korthikanti et al. 2022).
Also: the per-rank peak while the model is built (whole, or partitioned under ``deepspeed.zero.Init``)
and ZeRO-3's all-gather / reduce-scatter bytes per step with the shared hypernetwork resident or
partitioned. Imports torch and the model code (to count parameters on the meta device), never DeepSpeed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.models.memory import (
    activation_bytes,
    build_peak_bytes,
    model_state_bytes,
    parameter_layout,
    rank_bytes,
    zero3_comm_bytes,
)

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # total memory as nvidia-smi reports it
    bf16_tflops: float  # dense bf16 tensor-core peak (datasheet, no sparsity)


GPUS: Dict[str, GPU] = {
    "h100-sxm": GPU("NVIDIA H100 SXM5 80 GB", 79.6, 989.4),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80 GB", 79.6, 756.0),
    "h200": GPU("NVIDIA H200 SXM 141 GB", 139.8, 989.4),
    "a100-40": GPU("NVIDIA A100 SXM4 40 GB", 40.0, 312.0),
    "a100-80": GPU("NVIDIA A100 SXM4 80 GB", 80.0, 312.0),
    "l40s": GPU("NVIDIA L40S 48 GB", 45.0, 362.1),
}
ALIASES = {"h100": "h100-sxm"}
USABLE = 0.9  # of a GPU's memory: the rest for the CUDA context, allocator fragmentation and NCCL buffers
MAX_MICRO = 65536


def gpu_of(name: Optional[str], mem_gib: Optional[float]) -> GPU:
    if mem_gib is not None:
        if mem_gib <= 0:
            raise ConfigError(f"--gpu-mem {mem_gib} is not a positive number of GiB — e.g. --gpu-mem 80")
        return GPU(f"{mem_gib:g} GiB GPU", mem_gib, float("nan"))
    key = (name or "h100-sxm").lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise ConfigError(
            f"unknown GPU --gpu {name!r} — use one of {', '.join(GPUS)} (h100 = h100-sxm), or give its memory "
            "with --gpu-mem GiB"
        )
    return GPUS[key]


def _precision(run: RunConfig) -> str:
    return "bf16" if run.deepspeed.precision == "auto" else run.deepspeed.precision  # auto = bf16 on a capable GPU


def configured_stage(run: RunConfig) -> int:
    """The ZeRO stage the run will use: a DeepSpeed JSON (deepspeed.config) wins over deepspeed.zero_stage."""
    if run.deepspeed.config:
        try:
            with open(run.deepspeed.config) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage", "auto")
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot read deepspeed.config={run.deepspeed.config}: {err} — check the path and the JSON"
            ) from None
        if isinstance(stage, int):
            return stage
    return run.deepspeed.zero_stage


def plan(run: RunConfig, gpus: int, gpu: GPU, mfu: float, layout: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from scale_hyper.config.batch import global_batch, split_batch
    from scale_hyper.models.flops import train_flops_per_token

    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} is not a positive number of GPUs — e.g. --gpus 8")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is not in (0, 1] — e.g. --mfu 0.4")
    t = run.train
    global_ = global_batch(t.global_batch_size, t.micro_batch_size, gpus)
    micro, accum = split_batch(global_, t.micro_batch_size, gpus)
    layout = layout or parameter_layout(run)
    precision = _precision(run)
    usable = gpu.memory_gib * GiB * USABLE
    ckpt_on = t.activation_checkpointing != "none"
    stages: List[Dict[str, Any]] = []
    for stage in range(4):
        part = rank_bytes(run, layout, stage, gpus, precision, micro, accum)
        state, fixed = part["state"], part["fixed"]
        fits = {}
        for ckpt in (False, True):
            best = 0
            lo, hi = 1, MAX_MICRO
            while lo <= hi:  # activations grow linearly in the micro batch: bisect
                mid = (lo + hi) // 2
                if fixed + activation_bytes(run, mid, ckpt, precision) <= usable:
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            fits["checkpointing" if ckpt else "plain"] = best
        stages.append({
            "stage": stage, **{f"{k}_bytes": v for k, v in state.items()}, "model_state_bytes": sum(state.values()),
            "bucket_bytes": part["bucket"], "gathered_bytes": part["gathered"], "offloaded_bytes": part["offloaded"],
            "activations_bytes": part["activations"], "total_bytes": part["total"],
            "fits": part["total"] <= usable, "max_micro": fits,
        })  # fmt: skip
    flops_token = train_flops_per_token(run.model, run.data.seq_len, run.data.mask_prob)
    tokens_step = global_ * run.data.seq_len
    peak = gpu.bf16_tflops * 1e12 if precision in ("bf16", "fp16") else float("nan")
    step_s = flops_token * tokens_step / (gpus * peak * mfu) if peak == peak else None
    zero_stage = configured_stage(run)
    configured = stages[zero_stage]
    key = "checkpointing" if ckpt_on else "plain"
    if stages[3]["max_micro"]["checkpointing"] == 0:  # ZeRO-3 with checkpointing needs the least
        raise ConfigError(
            f"{run.model.mixer} ({layout['params']:,} parameters) does not fit on {gpus} × {gpu.name} even with "
            f"ZeRO-3, micro batch 1 and activation checkpointing — use more GPUs (--gpus), GPUs with more memory "
            "(--gpu / --gpu-mem), a smaller model, or CPU offload (deepspeed.offload_optimizer=true, "
            "deepspeed.offload_param=true)"
        )
    wire = (gpus - 1) / gpus
    comm = {kind: zero3_comm_bytes(layout, precision, kind == "resident") for kind in ("resident", "partitioned")}
    suggest = None
    if configured["max_micro"][key]:
        s_micro, s_accum = split_batch(global_, min(t.micro_batch_size, configured["max_micro"][key]), gpus)
        suggest = {"micro": s_micro, "accumulation": s_accum}
    return {
        "gpu": {"name": gpu.name, "memory_gib": gpu.memory_gib, "bf16_tflops": gpu.bf16_tflops, "usable_fraction": USABLE},
        "gpus": gpus, "precision": precision, "params": layout["params"], "zero_stage": zero_stage,
        "activation_checkpointing": ckpt_on, "seq_len": run.data.seq_len,
        "batch": {"global": global_, "micro_bound": t.micro_batch_size, "micro": micro, "accumulation": accum,
                  "fits_at_configured_stage": configured["fits"], "suggested_if_not": suggest},
        "tokens_per_step": tokens_step, "max_steps": t.max_steps, "token_budget": tokens_step * t.max_steps,
        "flops_per_token": flops_token, "mfu": mfu, "step_time_s": step_s,
        "days": step_s * t.max_steps / 86400 if step_s is not None else None,
        "stages": stages,
        "build_peak_bytes": {"whole": build_peak_bytes(layout, gpus, precision, partitioned=False),
                             "partitioned": build_peak_bytes(layout, gpus, precision, partitioned=True)},
        "zero3_comm_bytes": {**comm, "link_fraction": wire, "hypernet_params": layout["shared_numel"]},
    }  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def render(p: Dict[str, Any]) -> str:
    b, g = p["batch"], p["gpu"]
    lines = [
        f"plan: {p['gpus']} × {g['name']} ({g['memory_gib']:g} GiB, {USABLE:.0%} usable; bf16 peak "
        f"{g['bf16_tflops']:g} TFLOP/s), {p['precision']}, {p['params']:,} parameters, seq_len {p['seq_len']}",
        f"batch: global {b['global']} = micro {b['micro']} (bound {b['micro_bound']}) × accumulation "
        f"{b['accumulation']} × world {p['gpus']}; {p['tokens_per_step']:,} tokens/step",
        "",
        f"{'per-GPU memory, GiB':<24}  ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3",
    ]
    st = p["stages"]
    rows = [
        ("weights", [s["weights_bytes"] for s in st]),
        ("gradients", [s["gradients_bytes"] for s in st]),
        ("fp32 master weights", [s["master_bytes"] for s in st]),
        ("Adam moments (fp32)", [s["adam_bytes"] for s in st]),
        ("model state", [s["model_state_bytes"] for s in st]),
        ("offloaded (host/NVMe)", [-s["offloaded_bytes"] for s in st]),
        ("reduce bucket", [s["bucket_bytes"] for s in st]),
        ("gathered weights (Z3)", [s["gathered_bytes"] for s in st]),
        (f"activations, micro {b['micro']} *", [s["activations_bytes"]["plain"] for s in st]),
        ("  with act. ckpt *", [s["activations_bytes"]["checkpointing"] for s in st]),
        ("total (configured)", [s["total_bytes"] for s in st]),
    ]
    for name, vals in rows:
        lines.append(f"{name:<24}" + " ".join(_gib(v) for v in vals))
    lines.append(f"{'largest micro':<24}" + " ".join(f"{s['max_micro']['plain']:>8}" for s in st))
    lines.append(f"{'  with act. ckpt':<24}" + " ".join(f"{s['max_micro']['checkpointing']:>8}" for s in st))
    lines.append("* activations are analytic (Korthikanti et al. 2022 per-layer counts; scale_hyper/models/memory.py)")
    build, comm = p["build_peak_bytes"], p["zero3_comm_bytes"]
    lines.append(f"building the model, per rank: whole {build['whole'] / GiB:.2f} GiB (fp32), partitioned "
                 f"(deepspeed.zero.Init) {build['partitioned'] / GiB:.2f} GiB")  # fmt: skip
    res, part = comm["resident"], comm["partitioned"]
    lines.append(f"ZeRO-3 per step (every weight released after use): all-gather {res['all_gather'] / GiB:.2f} GiB with "
                 f"the hypernetwork resident, {part['all_gather'] / GiB:.2f} GiB partitioned; reduce-scatter "
                 f"{res['reduce_scatter'] / GiB:.2f} GiB; each rank's link carries {comm['link_fraction']:.3f} of it")  # fmt: skip
    stage = p["zero_stage"]
    verdict = "fits" if b["fits_at_configured_stage"] else "does NOT fit"
    lines.append(
        f"configured: ZeRO-{stage}, activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}: {verdict}"
    )
    if not b["fits_at_configured_stage"] and b["suggested_if_not"]:
        s = b["suggested_if_not"]
        lines.append(f"  → train.micro_batch_size={s['micro']} (accumulation {s['accumulation']}) fits at ZeRO-{stage}")
    if p["step_time_s"] is not None:
        lines.append(
            f"compute: {p['flops_per_token'] / 1e9:.2f} GFLOP/token (models/flops.py) at MFU {p['mfu']:.0%}: "
            f"{p['step_time_s']:.3f} s/step; {p['max_steps']:,} steps = {p['token_budget'] / 1e9:.2f} B tokens "
            f"= {p['days']:.2f} days"
            + (" (+1/3 with activation checkpointing)" if p["activation_checkpointing"] else "")
        )
    else:
        lines.append("compute: no bf16 peak for this GPU (--gpu-mem): step time not estimated")
    return "\n".join(lines)


def main(run: RunConfig, gpus: int, gpu: Optional[str], gpu_mem: Optional[float], mfu: float, as_json: bool) -> int:
    p = plan(run, gpus, gpu_of(gpu, gpu_mem), mfu)
    print(json.dumps(p, sort_keys=True) if as_json else render(p))
    sys.stdout.flush()
    return 0


__all__: List[str] = ["GPUS", "activation_bytes", "gpu_of", "main", "model_state_bytes", "parameter_layout", "plan"]
