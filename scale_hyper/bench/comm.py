"""ZeRO-3 communication: what DeepSpeed's collectives move per step, and what that costs at scale.

``CollectiveCounter`` counts the calls and bytes of DeepSpeed's collectives by kind (measured on 2 CPU
ranks by tests/comm_worker.py); ``zero3_step_model`` is the first-order step-time model over the
number of nodes. Both feed docs/benchmarks.md, "ZeRO-3 communication". DeepSpeed is imported only
when a counter is entered.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

_KINDS = {
    "all_gather_into_tensor": "all_gather", "all_gather": "all_gather", "all_gather_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
    "broadcast": "other", "all_to_all_single": "other",
}  # fmt: skip


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _collective_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Logical size of one collective: the full (gathered / pre-reduction) tensor, as nccl-tests counts it.
    A ring moves (W-1)/W of this through each rank's link."""

    def arg(i, *names):
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i] if len(args) > i else None

    if name == "all_gather_into_tensor":
        return _nbytes(arg(0, "output_tensor"))
    if name == "all_gather":
        return _nbytes(arg(0, "tensor_list"))
    if name == "reduce_scatter_tensor":
        return _nbytes(arg(1, "input_tensor", "tensor"))
    if name == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    return _nbytes(arg(0, "tensor", "tensors", "output"))


class CollectiveCounter:
    """Count calls and bytes of the collectives DeepSpeed issues, by kind (all_gather, reduce_scatter, ...).

    DeepSpeed 0.19.8 routes every `deepspeed.comm` collective through one backend object
    (`deepspeed.comm.comm.cdb`, a TorchBackend on gloo/nccl) whose all-gather/reduce-scatter functions
    are bound to torch.distributed at init, so wrapping `torch.distributed.*` afterwards would miss
    them: the backend's methods are wrapped instead. Calls made directly on torch.distributed
    (bypassing DeepSpeed) are tallied separately under `torch_direct` as a cross-check.
    """

    TORCH_FNS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "all_reduce", "reduce_scatter")

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        self.torch_direct: Dict[str, int] = {}
        self._undo: List[tuple] = []
        self._inside = 0

    def reset(self) -> None:
        for tally in (self.bytes, self.calls, self.torch_direct):
            tally.clear()

    def _wrap(self, owner, name: str, kind: Optional[str]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        counter = self

        def wrapped(*args, **kwargs):
            size = _collective_bytes(name, args, kwargs)
            if kind is None:  # torch.distributed level: only what did not come through DeepSpeed
                if not counter._inside:
                    counter.torch_direct[name] = counter.torch_direct.get(name, 0) + size
                return original(*args, **kwargs)
            counter.bytes[kind] = counter.bytes.get(kind, 0) + size
            counter.calls[kind] = counter.calls.get(kind, 0) + 1
            counter._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside -= 1

        setattr(owner, name, wrapped)
        self._undo.append((owner, name, original, name in vars(owner)))

    def __enter__(self) -> CollectiveCounter:
        import deepspeed.comm.comm as ds_comm

        if ds_comm.cdb is None:
            raise RuntimeError("CollectiveCounter: DeepSpeed's comm backend is not initialised")
        for name, kind in _KINDS.items():
            self._wrap(ds_comm.cdb, name, kind)
        for name in self.TORCH_FNS:
            self._wrap(torch.distributed, name, None)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, own in reversed(self._undo):
            if own:  # a module function or an instance attribute: put it back
                setattr(owner, name, original)
            else:  # a method found on the class: drop the instance attribute that shadows it
                delattr(owner, name)
        self._undo.clear()


# --- Analytic ZeRO-3 step time vs number of nodes -------------------------------------------------


def zero3_step_model(
    params: int,
    hyper_params: int,
    layers: int,
    flops_per_token: float,
    tokens_per_gpu: int,
    nodes: int,
    resident: bool,
    gpus_per_node: int = 8,
    peak: float = 989e12,
    mfu: float = 0.4,
    bytes_per_param: int = 2,
    nvlink_bw: float = 360e9,
    net_bw: float = 45e9,
) -> dict:
    """Seconds per optimizer step of ZeRO-3 data parallelism, first order.

    compute = tokens_per_gpu × flops_per_token / (peak × mfu).
    Gathered per step: every weight twice (forward, backward), except the shared hypernetwork, which a
    partitioned ZeRO-3 gathers at each of its 2·L uses and a resident one once (after the step);
    gradients are reduce-scattered once. A ring moves (W-1)/W of each collective through every GPU's
    link: NVLink bandwidth within one node, the per-GPU network bandwidth across nodes.
    """  # fmt: skip
    world = nodes * gpus_per_node
    gathered = 2 * (params - hyper_params) + (1 if resident else 2 * layers) * hyper_params
    wire = (world - 1) / world * bytes_per_param * (gathered + params)  # all-gathers + reduce-scatter
    bw = nvlink_bw if nodes == 1 else net_bw
    compute = tokens_per_gpu * flops_per_token / (peak * mfu)
    comm = wire / bw
    return {"compute_s": compute, "comm_s": comm, "serial_s": compute + comm, "overlapped_s": max(compute, comm)}
