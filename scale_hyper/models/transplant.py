"""Model surgery of the transplant protocol (models.md): from a trained shallow model (L layers)
build an N-layer one at a fixed budget of MIXING parameters, then continue MLM training.

* hyperbert: the trained shared hypernetwork is reused unchanged. Its layer-embedding table grows
  from L to N rows: the first L rows are the trained ones; new rows are copied cyclically
  (``cycle``, default: row i = trained row i mod L), linearly interpolated over depth
  (``interpolate``: all N rows resampled from the L trained ones, so row 0 and row N-1 are the
  trained first and last), or left freshly initialised (``fresh``). The only mixing parameters
  added are those N-L rows (N-L)·d_h and the per-layer output LayerNorm of the generated MLP
  (2d per new layer), both reported.
* bert (and hypermixer, hyla: every mixer with per-layer weights): ALBERT-style sharing. The new
  model's layer i mixer IS the module of trained layer ``map(i)``: the same parameters, so the
  mixing-parameter count does not change at all.
* FFNs and the norms around the blocks (and the embeddings, MLM head) are copied from trained
  layer ``map(i)``: ``cycle`` → map(i) = i mod L; ``stretch`` → map(i) = ⌊i·L/N⌋ (each trained
  layer repeated in place). These copies are independent parameters.

``transplant`` returns the deeper model in memory and a description of it (mapping, sharing,
parameter budget); reading a source and writing the output directory is the verb's job
(``scale_hyper.evaluation.transplant``, `scale-hyper transplant`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List

import torch
from torch import nn

from .encoder import mixer_map
from .modeling_scale_hyper import ScaleHyperForMaskedLM, build_model

_LAYER_KEY = re.compile(r"^(model\.encoder\.layers\.)(\d+)(\..*)$")
_SHARED_KEY = re.compile(r"^model\.encoder\.shared_mixers\.(\d+)(\..*)$")
LAYER_EMB = "model.encoder.hypernet.layer_embeddings.weight"


def layer_map(n: int, src_layers: int, order: str = "cycle") -> List[int]:
    return mixer_map(n, src_layers, order)


def mixing_parameters(model: ScaleHyperForMaskedLM) -> int:
    """Unique parameters of the token mixing: the shared hypernetwork (if any) + every layer's mixer."""
    encoder = model.model.encoder
    seen: Dict[int, int] = {}
    modules = encoder.shared_modules() + [encoder.mixer(i) for i in range(len(encoder.layers))]
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() is already deduplicated


def _interpolate_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    src = rows.shape[0]
    if src == 1:
        return rows.expand(n, -1).clone()
    pos = torch.linspace(0, src - 1, n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    w = (pos - lo.double()).to(rows.dtype)[:, None]
    return rows[lo] * (1 - w) + rows[hi] * w


def transplant(src_model: nn.Module, layers: int, embeddings: str = "cycle", order: str = "cycle",
               seed: int = 0) -> tuple[ScaleHyperForMaskedLM, Dict[str, Any]]:  # fmt: skip
    """The deeper model (in memory, mixers shared where the protocol says) and a description."""
    if not isinstance(src_model, ScaleHyperForMaskedLM):
        raise ValueError("transplant needs a scale-hyper model (a checkpoint, a run directory or our HF export)")
    if embeddings not in ("cycle", "interpolate", "fresh"):
        raise ValueError(f"embeddings={embeddings!r} is not one of cycle, interpolate, fresh")
    mc = src_model.config.to_model_config()
    src_layers = mc.num_layers
    if layers < src_layers:
        raise ValueError(f"--layers {layers} is fewer than the source's {src_layers}")
    mapping = layer_map(layers, src_layers, order)
    torch.manual_seed(seed)  # what stays freshly initialised (fresh layer embeddings) is reproducible
    if mc.share_mixers:  # already shared (e.g. a transplant of a transplant): keep its k mixers
        new_mc = dataclasses.replace(mc, num_layers=layers)
    elif mc.mixer != "hyperbert" and layers > src_layers:  # ALBERT-style: the L trained mixers, shared
        new_mc = dataclasses.replace(mc, num_layers=layers, share_mixers=src_layers, share_order=order)
    else:  # hyperbert: the hypernetwork is already shared; each layer keeps its own output LayerNorm
        new_mc = dataclasses.replace(mc, num_layers=layers)
    model = build_model(new_mc, task="mlm")
    assert isinstance(model, ScaleHyperForMaskedLM)
    src_state = src_model.state_dict()
    state = model.state_dict()
    for key in state:
        if key == LAYER_EMB:
            continue
        layer_key, shared_key = _LAYER_KEY.match(key), _SHARED_KEY.match(key)
        if layer_key:
            from_key = f"{layer_key[1]}{mapping[int(layer_key[2])]}{layer_key[3]}"
        elif shared_key and not mc.share_mixers:
            from_key = f"model.encoder.layers.{shared_key[1]}.mixer{shared_key[2]}"
        else:
            from_key = key
        if from_key not in src_state:
            raise RuntimeError(f"no source tensor for {key} (looked for {from_key})")
        state[key] = src_state[from_key].clone()
    if LAYER_EMB in state:
        rows = src_state[LAYER_EMB]
        if embeddings == "cycle":
            state[LAYER_EMB] = rows[[i % src_layers for i in range(layers)]].clone()
        elif embeddings == "interpolate":
            state[LAYER_EMB] = _interpolate_rows(rows, layers)
        else:  # fresh: trained rows kept, new rows as initialised
            state[LAYER_EMB][:src_layers] = rows
    model.load_state_dict(state)
    encoder = model.model.encoder
    info = {
        "source_layers": src_layers, "layers": layers, "mixer": mc.mixer, "order": order,
        "layer_map": mapping, "layer_embeddings": embeddings if mc.mixer == "hyperbert" else None,
        "share_mixers": new_mc.share_mixers, "share_order": new_mc.share_order,
        "mixer_of_layer": encoder.mixer_of_layer,
        "mixing_params_source": mixing_parameters(src_model), "mixing_params": mixing_parameters(model),
        "total_params_source": unique_parameters(src_model), "total_params": unique_parameters(model),
    }  # fmt: skip
    return model, info
