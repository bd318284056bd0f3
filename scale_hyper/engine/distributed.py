"""Process-group setup that works the same under a plain `python`, the deepspeed launcher,
torchrun and srun.

The launcher-environment mapping (srun's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS onto the
torch.distributed names) and the device choice live in ``scale_hyper.dist``, shared with ``doctor``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from scale_hyper.dist import map_launcher_env, pick_device

__all__ = ["DistInfo", "init_distributed", "map_launcher_env", "pick_device"]


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
    # DeepSpeed reads its own timeout variable in some code paths; keep both in step.
    os.environ.setdefault("DEEPSPEED_TIMEOUT", str(max(1, int(timeout_minutes))))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            verbose=False,
        )
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, master=master)
