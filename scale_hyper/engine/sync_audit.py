"""A test and benchmark instrument: counts device→host syncs and collectives per optimizer step,
by call site, telling ours (scale_hyper/) apart from DeepSpeed's.

Off unless SCALE_HYPER_SYNC_AUDIT=PREFIX is set; then every rank writes PREFIX.rankR.json at exit:
``{"steps": {"K": {"scale_hyper/engine/x.py:12 .item": n, ...}}}`` where interval K holds the calls
made after optimizer step K was counted (its logging, evaluation, saving, stop check) and during the
micro-batches of step K+1 — so the interval after a step that did none of those is a plain step's.
Counted: Tensor.item/.tolist/.cpu(), float()/int()/bool() of a tensor, .to("cpu"), and the
torch.distributed collectives.

Those are explicit calls. ``DataDependentShapes`` sees what they cannot: at the dispatcher (a
TorchDispatchMode, so also inside torch functions and in backward), every aten op whose output shape
depends on tensor values — nonzero, boolean-mask indexing and index_put, masked_select, unique,
bincount, … — each of which makes the host wait for the device. It goes under ``"shapes"`` in the
same per-step layout (the site is the Python caller; for backward, whoever called backward).

``SCALE_HYPER_SYNC_DEBUG=error`` (CUDA, ``strict``): torch's own detector on our part of each step,
which also sees the syncs no explicit call makes (boolean indexing, nonzero, a pageable copy).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "gather", "scatter", "all_to_all", "all_to_all_single")  # fmt: skip
_SYNCS = {"item": ".item", "tolist": ".tolist", "cpu": ".cpu", "__float__": "float()", "__int__": "int()",
          "__bool__": "bool()"}  # fmt: skip
_TORCH_DIR = os.path.dirname(torch.__file__)


_aten = torch.ops.aten
_INDEXING = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default)


def has_data_dependent_shape(func: Any, args: tuple, kwargs: Dict[str, Any]) -> bool:
    """Whether this call of aten op ``func`` yields a tensor whose shape depends on tensor values (torch
    tags them ``dynamic_output_shape``; indexing only with a boolean mask, which needs its nonzero)."""
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func is _aten.one_hot.default:
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    return True


class DataDependentShapes(TorchDispatchMode):
    """Within ``with DataDependentShapes() as seen:``, ``seen.ops`` counts "site op" of every call with a
    data-dependent output shape (``site`` as the audit names it, "other" outside scale_hyper/deepspeed),
    and under "ops seen" every op."""

    def __init__(self, when: Callable[[], Optional[Counter]] = lambda: None) -> None:
        super().__init__()
        self.ops: Counter = Counter()  # also "ops seen": every op that passed, so a check knows it was looking
        self.when = when  # the Counter to record into now (None: into self.ops)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[Dict[str, Any]] = None):
        kwargs = kwargs or {}
        into = self.when()
        into = self.ops if into is None else into
        into["ops seen"] += 1
        if has_data_dependent_shape(func, args, kwargs):
            into[f"{_site(2) or 'other'} {func}"] += 1
        return func(*args, **kwargs)


def _site(depth: int) -> Optional[str]:
    frame: Optional[FrameType] = sys._getframe(depth + 1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename
    for root in ("scale_hyper", "deepspeed"):
        marker = f"{os.sep}{root}{os.sep}"
        if marker in path:
            return f"{root}/{path.rsplit(marker, 1)[1]}:{frame.f_lineno}"
    return None  # tests, libraries: not the training process's hot path


class _Audit:
    def __init__(self, prefix: str) -> None:
        self.prefix, self.step = prefix, -1
        self.counts: Dict[int, Counter] = defaultdict(Counter)
        self.shapes: Dict[int, Counter] = defaultdict(Counter)
        self.mode: Optional[DataDependentShapes] = None

    def site(self) -> Optional[str]:
        return _site(2)

    def wrap(self, fn: Callable, label: str, only: Optional[Callable[..., bool]] = None) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.step >= 0 and (only is None or only(*args, **kwargs)):
                where = self.site()
                if where:
                    self.counts[self.step][f"{where} {label}"] += 1
            return fn(*args, **kwargs)

        return counted

    def write(self) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(f"{self.prefix}.rank{rank}.json", "w") as f:
            json.dump({"steps": {str(k): dict(v) for k, v in sorted(self.counts.items())},
                       "shapes": {str(k): dict(v) for k, v in sorted(self.shapes.items())}}, f, indent=1)  # fmt: skip


_active: Optional[_Audit] = None


def _to_cpu(tensor: Any, *args: Any, **kwargs: Any) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return str(target).startswith("cpu")


def install_if_requested() -> None:
    global _active
    prefix = os.environ.get("SCALE_HYPER_SYNC_AUDIT")
    if not prefix or _active is not None:
        return
    _active = audit = _Audit(prefix)
    for name, label in _SYNCS.items():
        setattr(torch.Tensor, name, audit.wrap(getattr(torch.Tensor, name), label))
    torch.Tensor.to = audit.wrap(torch.Tensor.to, '.to("cpu")', only=_to_cpu)  # type: ignore[method-assign]
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, audit.wrap(getattr(dist, name), f"dist.{name}"))
    audit.mode = DataDependentShapes(when=lambda: audit.shapes[audit.step])
    atexit.register(audit.write)


_SYNC_DEBUG = os.environ.get("SCALE_HYPER_SYNC_DEBUG", "")  # warn | error: torch.cuda's sync debug mode


@contextmanager
def strict(device: torch.device, step: int) -> Iterator[None]:
    """Our part of every step after the first (the batch to the device, the forward, the loss window)
    under ``torch.cuda.set_sync_debug_mode(SCALE_HYPER_SYNC_DEBUG)``: with "error" any device→host
    sync there raises, naming its site (`.ci/gpu`). DeepSpeed's backward and step stay outside (its
    own syncs are counted by the audit above). Off unless set; a no-op off CUDA."""
    if not _SYNC_DEBUG or device.type != "cuda" or step < 1:
        yield
        return
    torch.cuda.set_sync_debug_mode(_SYNC_DEBUG)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def mark_step(step: int) -> None:
    """Called once per optimizer step, right after it is counted (watchdog.count_update)."""
    if _active is not None:
        if _active.step < 0 and _active.mode is not None:
            # From the first counted step on, for the rest of the process, on this (the training) thread:
            # every op passes through the mode (not before: set-up would pay its per-op cost for nothing).
            _active.mode.__enter__()
        _active.step = step
