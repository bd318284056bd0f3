"""RANK/LOCAL_RANK/WORLD_SIZE from torchrun, the deepspeed launcher, or srun, and the rank's device
(whether the task sees all of its node's GPUs or only its own).

srun sets only SLURM_* variables (DeepSpeed's own `--launcher slurm` falls back to mpi4py), so when
RANK is missing we map SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS onto the torch.distributed names.
"""

from __future__ import annotations

import os
import socket
import subprocess

import torch

from scale_hyper.config import ConfigError


def first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:  # expands compressed lists such as node[01-04]
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0].split("[")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def map_launcher_env(env=os.environ) -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM or single-process defaults."""
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("MASTER_ADDR", first_slurm_host())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    if "RANK" not in env:  # one plain process
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def cuda_index(local_rank: int, visible: int) -> int:
    """Which of the GPUs this task sees belongs to LOCAL_RANK.

    A task sees either all of its node's GPUs (the srun templates, torchrun, the deepspeed launcher):
    its GPU is number LOCAL_RANK; or only its own (``srun --gpus-per-task=1``, ``--gpu-bind=single:1``,
    a site default binding one GPU per task, CUDA_VISIBLE_DEVICES set per task): GPU 0 of one.
    """
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this task sees {visible} GPUs (CUDA_VISIBLE_DEVICES={shown}): it can tell "
        "neither GPU LOCAL_RANK of the node nor a GPU of its own — start one task per GPU and give each task "
        "either all of the node's GPUs (srun without --gpus-per-task) or exactly one (srun --gpus-per-task=1)"
    )


def pick_device(choice: str, local_rank: int, env=os.environ) -> torch.device:
    """train.device (auto | cpu | cuda) → this rank's device (``cuda_index`` of LOCAL_RANK).

    Where a task sees only its own GPU, LOCAL_RANK (≥ 1 on all but one task of a node) is not a GPU
    number of this task. DeepSpeed reads LOCAL_RANK as one (``engine`` and ``zero.Init`` call
    ``set_device(LOCAL_RANK)``, NCCL binds ``cuda:LOCAL_RANK``), so it is set to the index chosen:
    every such rank would otherwise fail with "invalid device ordinal". The node-local rank stays
    in ``DistInfo.local_rank``.
    """
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        index = cuda_index(local_rank, torch.cuda.device_count())
        env["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
