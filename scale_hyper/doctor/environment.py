"""Environment per rank: versions, GPU, bf16, DeepSpeed ops, TORCH_CUDA_ARCH_LIST — and the same
versions on every rank (a mismatch is a FAIL naming the ranks)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from typing import Any, Dict, List

import torch

from scale_hyper.config import RunConfig
from scale_hyper.doctor.results import FAIL, PASS, Result, fault_rank

# Must be equal on every rank; the rest (host, free memory) is reported only.
COMPARED = ("python", "torch", "cuda", "nccl", "deepspeed", "triton", "transformers", "scale-hyper", "gpu")
# DeepSpeed ops a config needs: (op name, builder class, why).
_OPS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def node_id() -> str:
    """The node a rank runs on: its host name (and SLURM's node number: emulated nodes share a host)."""
    node = os.environ.get("SLURM_NODEID")
    return socket.gethostname() + (f"/{node}" if node is not None else "")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def needed_ops(run: RunConfig, device: torch.device) -> List[str]:
    ds = run.deepspeed
    ops = []
    if ds.optimizer == "cpu_adam" or ds.offload_optimizer:
        ops.append("cpu_adam")
    if ds.optimizer == "fused_adam":
        ops.append("fused_adam")
    return ops


def op_status(name: str) -> str:
    """prebuilt | JIT-buildable | not buildable: <why> — DeepSpeed's own compatibility check (ds_report's)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(name):
            return "prebuilt"
        builder = get_accelerator().create_op_builder(_OPS[name])
        if builder is None:
            return "not buildable: the accelerator has no builder for it"
        return "JIT-buildable" if builder.is_compatible(verbose=False) else "not buildable: incompatible (ds_report)"
    except Exception as err:  # noqa: BLE001 - a broken install is what this reports
        return f"not buildable: {type(err).__name__}: {str(err)[:120]}"


def collect(run: RunConfig, device: torch.device, rank: int) -> Dict[str, Any]:
    """This rank's environment (a JSON-able dict)."""
    info: Dict[str, Any] = {
        "rank": rank,
        "node": node_id(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "nccl": "none",
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "scale-hyper": _version("scale-hyper"),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "unset"),
        "gpu": "none",
        "gpu_memory_gib": None,
        "capability": None,
        "bf16": False,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        info.update(
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=bool(torch.cuda.is_bf16_supported()),
        )
    else:
        info["bf16"] = True  # CPU autocast and DeepSpeed's bf16 optimizer run everywhere (slowly)
    info["ops"] = {name: op_status(name) for name in needed_ops(run, device)}
    if fault_rank("version") == rank:  # test-only: a rank with another DeepSpeed
        info["deepspeed"] = info["deepspeed"] + "+injected"
    return info


def _ranks(ranks: List[int]) -> str:
    return ",".join(map(str, ranks))


def check(run: RunConfig, infos: List[Dict[str, Any]]) -> Result:
    """Every rank's environment → one row."""
    problems = [f"rank {i['rank']}: the environment could not be read: {i['error']}" for i in infos if "error" in i]
    infos = [i for i in infos if "error" not in i]
    if not infos:
        return Result("environment", FAIL, "unreadable", "; ".join(problems))
    for key in COMPARED:
        groups: Dict[str, List[int]] = {}
        for info in infos:
            groups.setdefault(str(info[key]), []).append(info["rank"])
        if len(groups) > 1:
            parts = "; ".join(f"rank {_ranks(r)}: {v}" for v, r in sorted(groups.items(), key=lambda kv: kv[1]))
            problems.append(f"{key} differs between ranks ({parts})")
    first = infos[0]
    wants_bf16 = run.deepspeed.precision == "bf16" or (run.deepspeed.precision == "auto" and first["gpu"] != "none")
    no_bf16 = [i["rank"] for i in infos if not i["bf16"]]
    if run.deepspeed.precision == "bf16" and no_bf16:
        problems.append(f"deepspeed.precision=bf16 but rank {_ranks(no_bf16)} has no bf16 support")
    for info in infos:
        for op, status in info["ops"].items():
            if status.startswith("not buildable"):
                problems.append(f"rank {info['rank']}: DeepSpeed op {op} {status}")
    arch = first["TORCH_CUDA_ARCH_LIST"]
    notes = []
    caps = sorted({i["capability"] for i in infos if i["capability"]})
    if arch != "unset" and caps and not all(c in arch for c in caps):
        notes.append(f"TORCH_CUDA_ARCH_LIST={arch} lacks compute capability {','.join(caps)} (JIT-built ops)")
    nodes = sorted({i["node"] for i in infos})
    gpu = (
        first["gpu"]
        if first["gpu"] == "none"
        else f"{first['gpu']} {first['gpu_memory_gib']} GiB sm_{first['capability']}"
    )
    ops = ", ".join(f"{op} {status}" for op, status in first["ops"].items()) or "none needed (torch AdamW)"
    detail = (
        f"{len(infos)} rank(s) on {len(nodes)} node(s); torch {first['torch']}, CUDA {first['cuda']}, "
        f"NCCL {first['nccl']}, DeepSpeed {first['deepspeed']}, Triton {first['triton']}; GPU {gpu}; "
        f"bf16 {'yes' if first['bf16'] else 'no'}{' (used)' if wants_bf16 else ''}; DeepSpeed ops: {ops}; "
        f"TORCH_CUDA_ARCH_LIST={arch}"
    )
    if notes:
        detail += "; note: " + "; ".join(notes)
    if problems:
        return Result("environment", FAIL, f"{len(problems)} problem(s)", "; ".join(problems) + ". " + detail,
                      {"ranks": infos})  # fmt: skip
    return Result("environment", PASS, f"{len(infos)} rank(s) alike", detail, {"ranks": infos})
