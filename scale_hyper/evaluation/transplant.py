"""`scale-hyper transplant SRC --layers N [--embeddings cycle|interpolate|fresh] [--order cycle|stretch] --out DIR`

The transplant protocol (models.md): from a trained shallow model (L layers) build an N-layer one
at a fixed budget of MIXING parameters, then continue MLM training.

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

Output: a Hugging Face directory (weights, config with num_layers=N, tokenizer, ``transplant.json``
with the mapping, the sharing and the parameter budget). Shared mixers are stored as copies in the
safetensors file (the model config has no key for sharing yet); ``load_transplanted`` re-ties them
from ``transplant.json``. See the module notes in README/docs for continuing training.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from scale_hyper.evaluation import source as sources

_LAYER_KEY = re.compile(r"^(model\.encoder\.layers\.)(\d+)(\..*)$")
LAYER_EMB = "model.encoder.hypernet.layer_embeddings.weight"


def layer_map(n: int, src_layers: int, order: str = "cycle") -> List[int]:
    if order == "cycle":
        return [i % src_layers for i in range(n)]
    if order == "stretch":
        return [i * src_layers // n for i in range(n)]
    raise ValueError(f"order={order!r} is not one of cycle, stretch")


def mixing_parameters(model: nn.Module) -> int:
    """Unique parameters of the token mixing: the shared hypernetwork (if any) + every layer's mixer."""
    encoder = model.model.encoder
    seen: Dict[int, int] = {}
    modules = ([encoder.hypernet] if encoder.hypernet is not None else []) + [b.mixer for b in encoder.layers]
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() is already deduplicated


def share_mixers(model: nn.Module, sharing: Dict[int, int]) -> None:
    """Make layer i's mixer the very module of layer sharing[i] (ALBERT-style cross-layer sharing)."""
    layers = model.model.encoder.layers
    for i, j in sharing.items():
        layers[int(i)].mixer = layers[int(j)].mixer


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
               seed: int = 0) -> tuple[nn.Module, Dict[str, object]]:  # fmt: skip
    """The deeper model (in memory, mixers shared where the protocol says) and a description."""
    from scale_hyper.models import ScaleHyperForMaskedLM, build_model

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
    new_mc = dataclasses.replace(mc, num_layers=layers)
    model = build_model(new_mc, task="mlm")
    src_state = src_model.state_dict()
    state = model.state_dict()
    for key in state:
        m = _LAYER_KEY.match(key)
        from_key = f"{m[1]}{mapping[int(m[2])]}{m[3]}" if m else key
        if key == LAYER_EMB:
            continue
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
    sharing: Dict[int, int] = {}
    if mc.mixer != "hyperbert":
        first = {}
        for i, s in enumerate(mapping):
            first.setdefault(s, i)
            if first[s] != i:
                sharing[i] = first[s]
        share_mixers(model, sharing)
    info = {
        "source_layers": src_layers, "layers": layers, "mixer": mc.mixer, "order": order,
        "layer_map": mapping, "layer_embeddings": embeddings if mc.mixer == "hyperbert" else None,
        "shared_mixers": {str(k): v for k, v in sharing.items()},
        "mixing_params_source": mixing_parameters(src_model), "mixing_params": mixing_parameters(model),
        "total_params_source": unique_parameters(src_model), "total_params": unique_parameters(model),
    }  # fmt: skip
    return model, info


def save(model: nn.Module, info: Dict[str, object], out: Path, tokenizer=None) -> Path:
    """HF directory. Shared mixers are written as copies (the config cannot express sharing)."""
    import copy

    out = Path(out)
    plain = copy.deepcopy(model)  # deepcopy keeps the sharing: untie in the copy only
    layers = plain.model.encoder.layers
    for i in info["shared_mixers"]:
        layers[int(i)].mixer = copy.deepcopy(layers[int(i)].mixer)
    plain.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "transplant.json").write_text(json.dumps(info, indent=1))
    return out


def load_transplanted(path: str | Path) -> nn.Module:
    """The saved model with its cross-layer mixer sharing restored (parameters of the shared layer)."""
    from transformers import AutoModelForMaskedLM

    import scale_hyper.models  # noqa: F401

    path = Path(path)
    model = AutoModelForMaskedLM.from_pretrained(path)
    info = json.loads((path / "transplant.json").read_text())
    share_mixers(model, {int(i): int(j) for i, j in info["shared_mixers"].items()})
    return model


def main(src: str, layers: int, out: Optional[str], embeddings: str, order: str, seed: int) -> int:
    try:
        source = sources.resolve(src)
        src_model = sources.load_mlm(source)
        model, info = transplant(src_model, layers, embeddings, order, seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: transplant: {err}", file=sys.stderr)
        return 2
    out_dir = Path(out or f"{source.path if source.kind == 'hf' else source.path.parent.parent}-transplant-L{layers}")
    info["source"] = str(source.path)
    try:
        tokenizer = sources.load_tokenizer_for(source)
    except (OSError, ValueError) as err:  # a bare model directory: weights without a tokenizer
        print(f"scale-hyper: transplant: no tokenizer copied ({str(err).splitlines()[0]})", file=sys.stderr)
        tokenizer = None
    save(model, info, out_dir, tokenizer)
    d = info["mixing_params"] - info["mixing_params_source"]
    print(
        f"transplanted {source.path} ({info['source_layers']} layers, {info['mixer']}) -> {out_dir} ({layers} layers)"
    )
    print(f"layer map (new layer -> trained layer): {info['layer_map']}")
    if info["shared_mixers"]:
        print(f"mixers shared across layers (new -> owner): {info['shared_mixers']}  (stored as copies; "
              "load_transplanted() re-ties them)")  # fmt: skip
    print(f"mixing parameters: {info['mixing_params_source']:,} -> {info['mixing_params']:,} ({d:+,}); "
          f"total {info['total_params_source']:,} -> {info['total_params']:,}")  # fmt: skip
    data = f" data.output={source.run.data.output}" if source.run is not None else ""
    print("continue MLM training (needs the train.init_from hook, see docs/experiments.md):")
    print(f"    scale-hyper train model.mixer={info['mixer']} model.num_layers={layers}{data} train.init_from={out_dir} "
          f"train.output_dir={out_dir}-run")  # fmt: skip
    return 0
