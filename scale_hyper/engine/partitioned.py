"""Building the model under ZeRO-3: partitioned from the first parameter, the shared modules whole.

Under ZeRO-3 with ``deepspeed.zero_init`` (default) the model is constructed inside
``deepspeed.zero.Init``: each module's parameters are split over the ranks as soon as that module's
``__init__`` returns, so no rank ever holds more than one module's full weights (the largest is the
word-embedding matrix). The model's initialisation runs through ``nn.Module.apply``, which the
context wraps to gather one module at a time, so the weights are the ones an unpartitioned build
draws from the same seed (tests/test_partitioned.py compares them).

The modules several layers share (``models.construction.build_shared``: HyperBERT's hypernetwork,
cross-layer shared mixers) are built outside the partitioning, whole, and then become ZeRO-3
parameters that are *persistent from the start*: each rank keeps the full weights and writes only its
slice into the partition the optimizer updates. They are never partitioned and gathered again; at
``deepspeed.initialize`` DeepSpeed's list of persistent parameters (which it refreshes after every
optimizer step) is made to include them (``registering_persistent``). DeepSpeed 0.19.8 internals
(``_convert_to_deepspeed_param``, ``shutdown_init_context``, ``mark_persistent_parameters``): pinned,
and covered by tests/test_partitioned.py.

``deepspeed.zero_init=false`` builds the whole model on every rank first and lets
``deepspeed.initialize`` split it (the pre-#20 behaviour, kept for comparison): the shared modules
are made persistent the same way before ``initialize``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch.distributed as dist
from torch import nn

from scale_hyper import runs
from scale_hyper.config import RunConfig
from scale_hyper.engine import ds_config


def builds_partitioned(run: RunConfig, ds: Dict[str, Any]) -> bool:
    return ds_config.zero_stage(ds) == 3 and run.deepspeed.zero_init


def is_partitioned(model: nn.Module) -> bool:
    """True when the model's parameters are ZeRO-3 parameters (partitioned or persistent)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _keep_whole(param: Any) -> None:  # a ZeRO-3 parameter (DeepSpeed adds ds_* attributes)
    """Write this rank's slice of ``param``'s full weights into its partition, keeping the full weights."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    full = param.data
    param.partition(has_been_updated=True)  # copies the slice into ds_tensor, then drops param.data
    param.data = full
    param.ds_status = ZeroParamStatus.AVAILABLE


def _replicate(init: Any, params: List[Any]) -> None:
    """Turn plain parameters into ZeRO-3 parameters that stay whole on every rank (``ds_persist``)."""
    for param in params:
        param.data = param.data.to(device=init.local_device, dtype=init.dtype)
        init._convert_to_deepspeed_param(param)
        param.ds_persist = True  # the partition then lives on the compute device, as for DeepSpeed's own
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(param.data, src=0)  # every rank keeps rank 0's weights, as zero.Init does for all
        _keep_whole(param)


def build(
    run: RunConfig,
    ds: Dict[str, Any],
    factory: Callable[[], nn.Module],
    weights: Optional[str] = None,
    verify: str = "full",
) -> Tuple[Any, Optional[str]]:
    """``factory()`` under ZeRO-3's rules — partitioned (zero_init) or whole, the shared modules
    persistent — with ``weights`` (train.init_from) loaded; returns the model and where they came from."""
    from scale_hyper.engine import init_from
    from scale_hyper.models.construction import shared_builder

    if ds_config.zero_stage(ds) != 3 or not run.deepspeed.zero_init:
        model = factory()
        loaded = init_from.load_weights(model, weights, verify) if weights else None
        if ds_config.zero_stage(ds) == 3 and run.deepspeed.hypernet_resident:
            import deepspeed

            _replicate(deepspeed.zero.Init(config_dict_or_path=ds), _shared_params(model))
        return model, loaded
    import deepspeed
    from deepspeed.runtime.zero import partition_parameters as zp

    whole: List[nn.Module] = []

    def build_whole(make: Callable[[], nn.Module]) -> nn.Module:
        zp.shutdown_init_context()  # plain construction: full tensors, the same draws from the seed
        try:
            module = make()
        finally:
            zp.restore_init_context()
        whole.append(module)
        return module

    init = deepspeed.zero.Init(config_dict_or_path=ds)
    with init, shared_builder(build_whole if run.deepspeed.hypernet_resident else None):
        model = factory()
    _replicate(init, [p for m in whole for p in m.parameters()])
    return model, (load_weights(model, weights, verify) if weights else None)


def _shared_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.shared_modules() for p in m.parameters()]  # type: ignore[operator]


@contextmanager
def registering_persistent() -> Iterator[None]:
    """Around ``deepspeed.initialize``: DeepSpeed collects its persistent parameters by size alone
    (``stage3_param_persistence_threshold``); this adds those already persistent from construction,
    so the optimizer refreshes them after each step and around checkpoints like its own."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    original = DeepSpeedZeRoOffload.mark_persistent_parameters

    def mark(self: Any, param_threshold: int, model_threshold: int) -> List[nn.Parameter]:
        found = original(self, param_threshold, model_threshold)
        ids = {id(p) for p in found}
        return found + [p for p in self.module.parameters() if getattr(p, "ds_persist", False) and id(p) not in ids]

    DeepSpeedZeRoOffload.mark_persistent_parameters = mark
    try:
        yield
    finally:
        DeepSpeedZeRoOffload.mark_persistent_parameters = original


def held_numel(model: nn.Module) -> Dict[str, int]:
    """Parameters this rank holds: its partitions, and the full weights it keeps gathered."""
    partition = sum(t.numel() for p in model.parameters() if (t := getattr(p, "ds_tensor", None)) is not None)
    gathered = sum(p.data.numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"total": total, "partition": partition, "gathered": gathered}


# --- train.init_from into a partitioned model -------------------------------------------------------------


class _Source:
    """The source's tensors, on rank 0 only: a safetensors export is read one tensor at a time (memory
    mapped); a DeepSpeed checkpoint is consolidated once (zero_to_fp32: one full fp32 copy on rank 0)."""

    def __init__(self, path: str, verify: str) -> None:
        source = runs.resolve(path, verify)  # a checkpoint is verified against its manifest (train.verify_checkpoint)
        self.where = str(source.path)
        self.tensors: Dict[str, Any] = {}
        if source.kind == "checkpoint":
            state = runs.consolidated_state_dict(source.path)
            self.tensors = {k: (lambda v=v: v) for k, v in state.items()}
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            return
        from safetensors import safe_open

        files = sorted(Path(source.path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"train.init_from={path!r}: no *.safetensors in {source.path}")
        self.shapes = {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            for key in handle.keys():
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
                self.tensors[key] = lambda h=handle, k=key: h.get_tensor(k)


def _mismatch(model: nn.Module, shapes: Dict[str, tuple], where: str) -> Optional[str]:
    ours = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing = sorted(set(ours) - set(shapes))
    unexpected = sorted(set(shapes) - set(ours))
    differ = [
        f"{n}: {shapes[n]} there, {ours[n]} here" for n in sorted(set(ours) & set(shapes)) if shapes[n] != ours[n]
    ]
    if not (missing or unexpected or differ):
        return None
    return (
        f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"other shapes {differ[:3]} — is it the same architecture (model.*) it was trained with?"
    )


def load_weights(model: nn.Module, path: str, verify: str = "full") -> str:
    """Copy SRC's weights into a ZeRO-3 model one module at a time: rank 0 reads, the partitions are
    written through ``GatheredParameters(modifier_rank=0)``, the persistent ones broadcast and re-sliced."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    source = _Source(path, verify) if rank == 0 else None
    box = [(_mismatch(model, source.shapes, source.where), source.where) if source else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    problem, where = box[0]  # type: ignore[misc]
    if problem:
        raise ValueError(problem)
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        params: List[Any] = list(module.parameters(recurse=False))
        split = [p for p in params if not p.ds_persist]
        with deepspeed.zero.GatheredParameters(split, modifier_rank=0, enabled=bool(split)):
            if source is not None:
                for p in params:
                    p.data.copy_(source.tensors[names[id(p)]]())
        for p in params:
            if p.ds_persist:
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(p.data, src=0)
                _keep_whole(p)
    return where
