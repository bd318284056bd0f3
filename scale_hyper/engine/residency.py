"""Keep the shared hypernetwork resident on every rank under ZeRO-3.

The trainer makes it resident at construction (``partitioned.build``: persistent ZeRO-3 parameters
from the start, never partitioned) and checks after ``deepspeed.initialize`` that DeepSpeed kept it so
(``resident_since_construction``). ``keep_resident`` marks an already-initialised engine's modules
persistent after the fact — the older route, which tests and benchmarks still use on models built
whole; it all-gathers the weights once.

ZeRO-3 has no per-module "do not partition" switch (DeepSpeed#7271), only a size threshold. Every
layer calls the one shared hypernetwork, so partitioning it would all-gather the same weights L times
per forward and again in backward. DeepSpeed's own "persistent parameter" mechanism is what the
size threshold uses; marking the hypernetwork's parameters persistent after `initialize` makes
them stay gathered through forward and backward, re-gathered once after each optimizer step.
Their gradients and Adam state stay reduce-scattered and sharded: only the working weights are
replicated. This touches DeepSpeed 0.19.8 internals, hence the pin and the regression tests.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn


def keep_resident(engine, modules: Iterable[nn.Module]) -> List[torch.nn.Parameter]:
    """Mark every parameter of `modules` persistent on a ZeRO-3 engine; return those newly marked.

    A no-op (returns []) for ZeRO stages 0–2, where all weights are replicated anyway.
    """
    optimizer = getattr(engine, "optimizer", None)
    persistent = getattr(optimizer, "persistent_parameters", None)
    if engine.zero_optimization_stage() != 3 or persistent is None:
        return []
    marked = []
    for module in modules:
        for param in module.parameters():
            if not hasattr(param, "ds_id"):
                raise RuntimeError(
                    "keep_resident: parameter is not managed by ZeRO-3 (call after deepspeed.initialize)"
                )
            if param.ds_persist and any(param is p for p in persistent):  # `in` compares tensors elementwise
                continue
            param.ds_persist = True
            persistent.append(param)
            marked.append(param)
    if marked:
        marked[0].all_gather(marked)  # available from the first forward on
    return marked


def resident_since_construction(engine, modules: Iterable[nn.Module]) -> List[torch.nn.Parameter]:
    """The modules' parameters, each checked to be persistent and in the optimizer's list of persistent
    parameters (gathered on first use, then re-gathered only after each step and checkpoint load).
    [] below ZeRO-3. DeepSpeed releases every parameter once inside ``initialize`` (after hooking its
    gradient) and after each use during its first step (the fetch-trace recording), persistent or not."""
    persistent = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
    if engine.zero_optimization_stage() != 3 or persistent is None:
        return []
    registered = {id(p) for p in persistent}
    params = [p for m in modules for p in m.parameters()]
    stray = [p for p in params if not (getattr(p, "ds_persist", False) and id(p) in registered)]
    if stray:
        raise RuntimeError(
            f"{len(stray)} of {len(params)} shared parameters are not persistent after deepspeed.initialize "
            "(were they built through models.construction.build_shared under partitioned.build?)"
        )
    return params


def is_available(param: torch.nn.Parameter) -> bool:
    """True when a ZeRO-3 parameter holds its full weights on this rank (always true below stage 3)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    status = getattr(param, "ds_status", None)
    return status is None or status == ZeroParamStatus.AVAILABLE
