"""Process-group setup that works the same under a plain `python`, the deepspeed launcher,
torchrun and srun.

Every process group waits ``Timings.collective_s`` (train.dist_timeout_minutes + 2 × the heartbeats'
grace) for a collective: the world group from the start, and DeepSpeed's own groups once
``deepspeed.initialize`` has made them (``all_groups_wait``), because ``torch.distributed.new_group``
without a timeout gives a group torch's default — 30 min on gloo, 10 on NCCL — whatever the world
group was given. That is why a rank stopped with SIGSTOP once went unnoticed for 30 minutes: the
others waited in DeepSpeed's gradient all-reduce, on its data-parallel group.

The launcher-environment mapping (srun's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS onto the
torch.distributed names) and the device choice live in ``scale_hyper.launch``, shared with ``doctor``.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch

from scale_hyper.engine.heartbeat import Timings
from scale_hyper.launch import map_launcher_env, pick_device

__all__ = ["DistInfo", "all_groups_wait", "init_distributed", "map_launcher_env", "pick_device"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    import deepspeed

    map_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_choice, local_rank)
    wait = Timings.of(timeout_minutes).collective_s
    # DeepSpeed reads its own timeout variable in some code paths; keep both in step.
    os.environ.setdefault("DEEPSPEED_TIMEOUT", str(max(1, math.ceil(wait / 60))))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=wait),
            verbose=False,
        )
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, master=master)


def all_groups_wait(timeout_minutes: float) -> None:
    """Give every process group that exists now (DeepSpeed's data-parallel, expert, sequence groups)
    the world group's collective timeout."""
    c10d = torch.distributed.distributed_c10d
    wait = datetime.timedelta(seconds=Timings.of(timeout_minutes).collective_s)
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(wait, group)
