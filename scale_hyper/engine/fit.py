"""Refuse, before anything is allocated, a model that cannot fit even fully partitioned.

The least a rank can get by with is ZeRO-3's share of the model state (less what offloading moves off
the device: to host memory on a GPU, to NVMe on either), the activations of one sequence with
activation checkpointing, and one module's full weights while it is gathered. When even that
exceeds the rank's memory (90 % of a GPU's; on CPU ranks, the host's available memory shared by the
node's ranks), the run stops with one line naming what would make it fit. The arithmetic is
``models/memory.py`` (what `scale-hyper plan` prints). An allocation that fails while the model is
being built gets the same line (``building``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Tuple

import torch

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.engine import ds_config
from scale_hyper.engine.distributed import DistInfo
from scale_hyper.models import memory

GiB = 1024**3
USABLE = 0.9


def capacity(info: DistInfo) -> Tuple[int, str]:
    """Bytes one rank may use, and a description."""
    if info.device.type == "cuda":
        total = torch.cuda.get_device_properties(info.device).total_memory
        return int(total * USABLE), f"{total / GiB:.0f} GiB GPU"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))  # ranks sharing this host's memory
    available = _host_available()
    return available // max(1, local), f"{available / GiB:.1f} GiB host memory available / {local} rank(s)"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def least_bytes(run: RunConfig, layout: Dict[str, Any], world: int, precision: str, device: torch.device) -> int:
    """The least one rank needs: ZeRO-3 state (minus offloaded), micro batch 1 with checkpointing, one module."""
    part = memory.rank_bytes(run, layout, 3, world, precision, 1, 1, host=device.type != "cuda")
    state = sum(part["state"].values()) - part["offloaded"]
    return (
        state + part["activations"]["checkpointing"] + layout["largest_module_numel"] * memory.weight_bytes(precision)
    )


def check(run: RunConfig, info: DistInfo, ds: Dict[str, Any]) -> None:
    limit, what = capacity(info)
    layout = memory.parameter_layout(run)
    precision = ds_config.precision_of(ds)
    need = least_bytes(run, layout, info.world_size, precision, info.device)
    if need <= limit:
        return
    ranks = info.world_size
    while ranks < 1 << 16 and least_bytes(run, layout, ranks, precision, info.device) > limit:
        ranks *= 2
    more = f"more ranks (about {ranks} at this memory per rank)" if ranks < 1 << 16 else "more ranks"
    offload = "deepspeed.offload_optimizer=true deepspeed.offload_param=true"
    if info.device.type != "cuda":
        offload += " deepspeed.offload_device=nvme deepspeed.nvme_path=DIR (CPU offload does not help CPU ranks)"
    raise ConfigError(
        f"{run.model.mixer} ({layout['params']:,} parameters) cannot fit on {info.world_size} rank(s) even fully "
        f"partitioned: ZeRO-3 needs at least {need / GiB:.1f} GiB per rank, this rank has {limit / GiB:.1f} GiB "
        f"({what}) — use {more}, offload ({offload}), train.activation_checkpointing=non_reentrant, a smaller "
        "train.micro_batch_size, or a smaller model"
    )


@contextmanager
def building(run: RunConfig) -> Iterator[None]:
    """An allocation that fails while the model is built is the same bad input, said the same way."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise ConfigError(
            f"building {run.model.mixer} ran out of memory ({str(err).splitlines()[0][:120]}) — use more ranks, "
            "deepspeed.zero_stage=3 (built partitioned), offload (deepspeed.offload_param=true), or a smaller model"
        ) from None
