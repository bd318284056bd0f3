"""Generate the DeepSpeed JSON from the run config (the config dataclasses stay the source of truth).

A JSON passed as `deepspeed.config` (e.g. `ds_configs/zero3.json`) is merged over the generated one:
its values win, and a value of "auto" means "take it from the scale-hyper config".
`deepspeed.extra` is merged last.

The run config arrives validated (``RunConfig.validate``, called by ``load_config``: choices, ranges,
offload_param needs ZeRO-3); only what needs the world size or the user's JSON is checked here.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict

import torch

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.config.batch import global_batch, split_batch


def batch_arithmetic(run: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, grad_accum, global). ``train.global_batch_size`` is the invariant (0 = bound × world);
    ``train.micro_batch_size`` is an upper bound on the micro batch (``split_batch``)."""
    bound = run.train.micro_batch_size
    global_ = global_batch(run.train.global_batch_size, bound, world_size)
    micro, accum = split_batch(global_, bound, world_size)
    return micro, accum, global_


def describe_batch(run: RunConfig, world_size: int) -> str:
    """The log line for the batch split chosen at start."""
    micro, accum, global_ = batch_arithmetic(run, world_size)
    note = (
        "" if micro == run.train.micro_batch_size else f" (bound train.micro_batch_size={run.train.micro_batch_size})"
    )
    return (
        f"batch: global {global_} sequences/step = micro {micro}{note} × accumulation {accum} × world {world_size}; "
        f"{global_ * run.data.seq_len:,} tokens/step"
    )


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU: fp32 is the fast path on most CPUs and the exact-resume reference


def _scheduler(run: RunConfig) -> Dict[str, Any]:
    t = run.train
    warmup = max(1, round(t.warmup_ratio * t.max_steps))  # DeepSpeed requires at least 1
    if t.decay == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    ratio = t.min_lr_ratio
    if ratio >= 1:  # constant after warm-up
        return {
            "type": "WarmupLR",
            "params": {
                "warmup_num_steps": warmup,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": t.lr,
                "warmup_type": "linear",
            },
        }
    # WarmupDecayLR reaches 0 at total_num_steps: stretch it so the LR is min_lr_ratio × peak at max_steps
    total = t.max_steps if ratio == 0 else (t.max_steps - ratio * warmup) / (1 - ratio)
    return {  # linear
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": total,
            "warmup_num_steps": warmup,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": t.lr,
            "warmup_type": "linear",
        },
    }


def _optimizer(run: RunConfig) -> Dict[str, Any]:
    t, ds = run.train, run.deepspeed
    params: Dict[str, Any] = {
        "lr": t.lr,
        "betas": list(t.adam_betas),
        "eps": t.adam_eps,
        "weight_decay": t.weight_decay,
    }
    if ds.optimizer == "adamw" and not ds.offload_optimizer:
        params["torch_adam"] = True  # no JIT build; FusedAdam needs TORCH_CUDA_ARCH_LIST on some machines
    return {"type": "AdamW", "params": params}


def generate(run: RunConfig, world_size: int, device: torch.device) -> Dict[str, Any]:
    ds = run.deepspeed
    micro, accum, global_ = batch_arithmetic(run, world_size)
    zero: Dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and device.type == "cuda",
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    where = {"device": ds.offload_device, "pin_memory": device.type == "cuda"}
    if ds.offload_device == "nvme":  # ZeRO-Infinity: DeepSpeed's async_io op swaps the state to this directory
        where["nvme_path"] = ds.nvme_path
    if ds.offload_optimizer:
        zero["offload_optimizer"] = dict(where)
    if ds.offload_param:
        zero["offload_param"] = dict(where)
    out: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_,
        "gradient_clipping": run.train.grad_clip,
        "zero_optimization": zero,
        "optimizer": _optimizer(run),
        "scheduler": _scheduler(run),
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    precision = resolve_precision(ds.precision, device)
    if precision == "bf16":
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}  # the non-finite guard relies on it
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return out


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build(run: RunConfig, world_size: int, device: torch.device) -> Dict[str, Any]:
    """The DeepSpeed config dict for this run: generated, then the user's JSON, then `extra`."""
    out = generate(run, world_size, device)
    if run.deepspeed.config:
        try:
            with open(run.deepspeed.config) as f:
                user = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"cannot read deepspeed.config={run.deepspeed.config}: {err} — check the path and the JSON"
            ) from None
        user.pop("//", None)  # comment key in our presets
        out = _merge(out, user)
        _check_batch(out, world_size)
    out = _merge(out, dict(run.deepspeed.extra))
    if "offload_optimizer" in out.get("zero_optimization", {}):
        out["optimizer"]["params"].pop("torch_adam", None)  # offloaded state needs DeepSpeedCPUAdam
    return out


def _check_batch(ds: Dict[str, Any], world_size: int) -> None:
    micro, accum, total = (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    )
    if micro * accum * world_size != total:
        raise ConfigError(
            f"DeepSpeed batch sizes disagree: micro {micro} × accumulation {accum} × world {world_size} != "
            f'train_batch_size {total} — use "auto" in the JSON to take them from train.* keys'
        )


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision_of(ds: Dict[str, Any]) -> str:
    """The precision a (possibly user-supplied) DeepSpeed config trains in."""
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled"):
            return name
    return "fp32"
