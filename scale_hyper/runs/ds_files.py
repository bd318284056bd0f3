"""DeepSpeed 0.19.8's checkpoint file layouts, told apart once, and the full fp32 weights of each.

What ``engine.save_checkpoint`` writes into a tag directory depends on the ZeRO stage, the
precision and which optimizer wrapper DeepSpeed chose (verified by saving tiny engines of every
kind, ``tests/test_ds_files.py``; names from ``runtime/engine.py``: ``_get_ckpt_name``,
``_get_zero_ckpt_prefix``). R is the data-parallel rank, ``bf16_`` the prefix of bf16 optimizers:

| kind             | written by                                    | files                                                        | fp32 weights from |
|------------------|-----------------------------------------------|--------------------------------------------------------------|-------------------|
| ``module``       | ZeRO-0 fp32 (a plain torch optimizer)         | ``mp_rank_00_model_states.pt``                               | its ``module`` (the weights themselves) |
| ``fp32_groups``  | ZeRO-0 bf16/fp16 (FP16_(Unfused)Optimizer)    | ``mp_rank_00_model_states.pt``                               | ``optimizer.fp32_groups`` (``_flat`` when fused); ``module`` is bf16/fp16 |
| ``zero``         | ZeRO-1/2 (DeepSpeedZeroOptimizer), any prec.  | ``mp_rank_00_model_states.pt`` + ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` | DeepSpeed's zero_to_fp32; ``module`` is bf16/fp16 |
| ``zero``         | ZeRO-3, any precision                         | ``zero_pp_rank_R_mp_rank_00_model_states.pt`` + ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` | zero_to_fp32 (no ``mp_rank_00_model_states.pt``) |
| ``bf16_optimizer`` | ZeRO-1 bf16 with ``data_types.grad_accum_dtype=fp32`` (BF16_Optimizer) | as ZeRO-1, ``bf16_`` files without ``zero_stage`` (zero_to_fp32 refuses them) | the partitions, by ``param_slice_mappings`` |
| ``universal``    | ``ds_to_universal`` of a ZeRO-1/2/3 checkpoint | ``zero/NAME/fp32.pt`` + a copy of the model-states file(s)  | ``zero/NAME/fp32.pt`` (flat under ZeRO-3) |

Only the ``module`` kind holds the master weights in its model-states file: reading ``module``
anywhere else silently takes bf16/fp16 copies. Nothing here imports DeepSpeed except the ``zero``
kind's reader.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
MODEL_STATES = "mp_rank_00_model_states.pt"
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (name, shape) of every trainable parameter in module order → the names of each optimizer group, in order.
GroupsOf = Callable[[Sequence[Tuple[str, torch.Size]]], List[List[str]]]


class LayoutError(ValueError):
    """A directory that holds no DeepSpeed checkpoint we can read; the message names what was found."""

    user_error = True


@dataclass(frozen=True)
class Layout:
    kind: str  # module | fp32_groups | zero | bf16_optimizer | universal
    stage: int  # ZeRO stage 0-3
    precision: str  # fp32 | bf16 | fp16: the dtype the module was trained in
    ranks: int  # data-parallel ranks that wrote it (1 for ZeRO-0)
    model_files: Tuple[Path, ...]
    optim_files: Tuple[Path, ...]

    def describe(self) -> str:
        return f"ZeRO-{self.stage} {self.precision} ({self.kind}, {self.ranks} rank{'s' * (self.ranks > 1)})"


def _deepspeed_globals() -> List[Any]:
    """The only non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint over every layout tests/test_ds_files.py saves)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # getattr: Python 3.12 pickles an enum member as getattr(ZeroStageEnum, "name") (the images' Python).
    # The unpickler still calls nothing outside this list, so getattr only reads attributes.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, getattr]


def _load(path: Path, mmap: bool = True) -> Any:
    """weights_only=True with DeepSpeed's few classes allowed: export, eval and init_from never run a
    pickle's code, so they are the safe way to take weights from an untrusted checkpoint."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            first = f"{named.group(1)}" if named else str(err).strip().splitlines()[0][:200]
            raise LayoutError(
                f"{path} holds an object outside the tensors and DeepSpeed classes a checkpoint needs ({first}) — "
                "it was not loaded (loading it could run code); take the weights from where the checkpoint was "
                "written and trusted (scale-hyper export there)"
            ) from None


def _by_rank(files: Sequence[Path], pattern: re.Pattern) -> Tuple[Path, ...]:
    return tuple(sorted(files, key=lambda f: int(pattern.match(f.name).group(pattern.groups))))  # type: ignore[union-attr]


def detect(ckpt: PathLike) -> Layout:
    """Which layout ``ckpt`` (one tag directory) holds. Reads the first model-states file (mmap)."""
    ckpt = Path(ckpt)
    names = {p.name: p for p in ckpt.iterdir()} if ckpt.is_dir() else {}
    zero3 = _by_rank([p for n, p in names.items() if _ZERO3_MODEL.match(n)], _ZERO3_MODEL)
    model_files = zero3 or ((names[MODEL_STATES],) if MODEL_STATES in names else ())
    optim = _by_rank([p for n, p in names.items() if _OPTIM.match(n)], _OPTIM)
    universal = (ckpt / "zero" / "optimizer_state.pt").is_file()
    if not model_files:
        raise LayoutError(
            f"{ckpt} holds no DeepSpeed model states ({MODEL_STATES} or zero_pp_rank_R_mp_rank_00_model_states.pt); "
            f"found: {', '.join(sorted(names)) or 'nothing'} — a checkpoint copied without its DeepSpeed files? "
            "Copy the whole step directory, or pass another checkpoint"
        )
    states = _load(model_files[0])
    precision = _module_precision(states, model_files[0])
    if universal:
        meta = _load(ckpt / "zero" / "optimizer_state.pt")
        stage = 3 if zero3 else int(meta.get("zero_stage", 1))
        return Layout("universal", stage, precision, int(states.get("dp_world_size", 1)), model_files, ())
    if zero3:
        return Layout("zero", 3, precision, len(zero3), model_files, optim)
    if optim:
        opt = _load(optim[0])["optimizer_state_dict"]
        if "zero_stage" not in opt:  # BF16_Optimizer: ZeRO-1 with fp32 gradient accumulation
            return Layout("bf16_optimizer", 1, precision, len(optim), model_files, optim)
        return Layout("zero", int(opt["zero_stage"]), precision, len(optim), model_files, optim)
    opt = states.get("optimizer") or {}
    kind = "fp32_groups" if ("fp32_groups" in opt or "fp32_groups_flat" in opt) else "module"
    return Layout(kind, 0, precision, 1, model_files, ())


def _module_precision(states: Dict[str, Any], where: Path) -> str:
    buffers = set(states.get("buffer_names") or ())
    for name, tensor in states["module"].items():
        if name not in buffers and tensor.is_floating_point():
            return _DTYPES.get(tensor.dtype, str(tensor.dtype))
    raise LayoutError(f"{where}: its module holds no floating-point parameter")


def fp32_state_dict(ckpt: PathLike, groups_of: Optional[GroupsOf] = None) -> Dict[str, torch.Tensor]:
    """The full fp32 master weights (and buffers) of a checkpoint in any layout, by parameter name.

    ``groups_of`` says how the trainer split the parameters into optimizer groups; only ZeRO-0 in
    bf16/fp16 needs it (its masters are stored per group, without names)."""
    layout = detect(ckpt)
    ckpt = Path(ckpt)
    if layout.kind == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's reader unpickles with weights_only=False: every file's pickle is checked first
        # (mapped, so only the pickle itself is read) and a file with a foreign object is refused.
        for f in (*layout.model_files, *layout.optim_files):
            _load(f)
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k: _fp32(v) for k, v in state.items()}
    states = _load(layout.model_files[0])
    if layout.kind == "module":
        return {k: _fp32(v) for k, v in states["module"].items()}
    if layout.kind == "fp32_groups":
        return _from_fp32_groups(states, groups_of, ckpt)
    if layout.kind == "bf16_optimizer":
        masters = _from_slice_mappings(states, layout.optim_files)
    else:
        masters = _from_universal(states, ckpt)
    return _with_buffers_and_aliases(masters, states)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _with_buffers_and_aliases(masters: Dict[str, torch.Tensor], states: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = OrderedDict()
    for name in states.get("buffer_names") or ():
        out[name] = _fp32(states["module"][name])
    out.update(masters)
    for alias, target in (states.get("shared_params") or {}).items():  # tied parameters: saved once
        out[alias] = out[target]
    return out


def _param_shapes(states: Dict[str, Any]) -> Dict[str, torch.Size]:
    return {n: torch.Size(s) for group in states["param_shapes"] for n, s in group.items()}


def _from_slice_mappings(states: Dict[str, Any], optim_files: Sequence[Path]) -> Dict[str, torch.Tensor]:
    """BF16_Optimizer: rank R's flat fp32 partition of group G holds fragments of parameters at the
    offsets ``param_slice_mappings[G][name]``; a parameter is its fragments in rank order."""
    fragments: Dict[str, List[torch.Tensor]] = OrderedDict((n, []) for n in _param_shapes(states))
    for path in optim_files:
        opt = _load(path)["optimizer_state_dict"]
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"], strict=True):
            for name, where in mapping.items():
                fragments[name].append(flat.narrow(0, where.start, where.numel))
    shapes = _param_shapes(states)
    return {name: torch.cat(parts).float().reshape(shapes[name]) for name, parts in fragments.items()}


def _from_universal(states: Dict[str, Any], ckpt: Path) -> Dict[str, torch.Tensor]:
    """ds_to_universal writes one folder per parameter; fp32.pt is {"param": shaped} from ZeRO-1/2
    and the flat tensor from ZeRO-3."""
    out = OrderedDict()
    for name, shape in _param_shapes(states).items():
        saved = _load(ckpt / "zero" / name / "fp32.pt", mmap=False)
        tensor = saved["param"] if isinstance(saved, dict) else saved
        out[name] = tensor.float().reshape(shape)
    return out


def _from_fp32_groups(states: Dict[str, Any], groups_of: Optional[GroupsOf], ckpt: Path) -> Dict[str, torch.Tensor]:
    """ZeRO-0 bf16/fp16: the masters are a list per optimizer group, in the order of the trainer's
    groups, without names. Every master must round to the module's copy, or nothing is returned."""
    module, opt = states["module"], states["optimizer"]
    buffers = set(states.get("buffer_names") or ())
    params, aliases = _unique_parameters(module, buffers)
    groups = groups_of([(n, module[n].shape) for n in params]) if groups_of else [params]
    groups = [g for g in groups if g]  # DeepSpeed drops empty groups
    flat = "fp32_groups" not in opt  # the fused FP16_Optimizer keeps one flat tensor per group
    stored = opt["fp32_groups_flat"] if flat else opt["fp32_groups"]
    found = [t.numel() for t in stored] if flat else [len(g) for g in stored]
    wanted = [sum(module[n].numel() for n in g) for g in groups] if flat else [len(g) for g in groups]
    if found != wanted:
        what = "elements" if flat else "tensors"
        raise LayoutError(
            f"{ckpt}: the optimizer holds fp32 masters in groups of {found} {what}, the model's parameter groups "
            f"have {wanted} — was it trained with another train.decay_embeddings?"
        )
    saved = (
        [_unflatten(t, [module[n].shape for n in g]) for t, g in zip(stored, groups, strict=True)] if flat else stored
    )
    out: Dict[str, torch.Tensor] = OrderedDict((n, _fp32(module[n])) for n in module if n in buffers)
    for names, masters in zip(groups, saved, strict=True):
        for name, master in zip(names, masters, strict=True):
            copy = module[name]
            if master.shape != copy.shape or not torch.equal(master.to(copy.dtype), copy):
                raise LayoutError(
                    f"{ckpt}: the fp32 master stored for {name} does not round to its {copy.dtype} weights — the "
                    "optimizer's parameter groups are not the ones this model would use"
                )
            out[name] = master.float()
    for alias, target in aliases.items():
        out[alias] = out[target]
    return out


def _unique_parameters(module: Dict[str, torch.Tensor], buffers: set) -> Tuple[List[str], Dict[str, str]]:
    """Parameter names in module order, a tensor saved under several names (tied) counted once, as
    ``named_parameters`` does; the other names map to the first."""
    first: Dict[Tuple[int, int], str] = {}
    names, aliases = [], {}
    for name, t in module.items():
        if name in buffers:
            continue
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in first and t.numel() > 0:
            aliases[name] = first[key]
        else:
            first[key] = name
            names.append(name)
    return names, aliases


def _unflatten(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat.narrow(0, offset, n).reshape(shape))
        offset += n
    return out
