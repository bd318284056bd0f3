"""Parameter accounting by component, and the comparison of a mixer against BERT of equal geometry."""

from __future__ import annotations

import dataclasses
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from .model_config import ModelConfig

COMPONENTS = ("embeddings", "mixers", "hypernetwork", "ffn", "heads")
# The three sums the comparison with BERT reports side by side (models.md): the headline total
# depends on the vocabulary (embeddings) and on max_position (BERT's position table and HyperBERT's
# hypernetwork position table P); non-embedding drops the encoder's embeddings (P stays, it is part
# of the hypernetwork); mixing is what replaces attention (mixers + shared hypernetwork).
DELTA_GROUPS = {
    "total": COMPONENTS,
    "non-embedding": ("mixers", "hypernetwork", "ffn", "heads"),
    "mixing": ("mixers", "hypernetwork"),
}


def component_of(name: str) -> str:
    """Component of a parameter, from its qualified name (any prefix before ``embeddings``/``encoder``)."""
    parts = name.split(".")
    if "hypernet" in parts:
        return "hypernetwork"
    if "embeddings" in parts:
        return "embeddings"
    if "mixer" in parts or "shared_mixers" in parts or "mixer_norm" in parts:
        return "mixers"
    # Pre-LN's final LayerNorm normalises the last FFN's residual stream: counted with the FFNs.
    if "ffn" in parts or "ffn_norm" in parts or "final_norm" in parts:
        return "ffn"
    if "lm_head" in parts or "classification_head" in parts:
        return "heads"
    raise ValueError(f"parameter {name!r} belongs to no known component; update params.component_of")


def weight_decay_groups(shapes: Iterable[Tuple[str, Sequence[int]]], decay_embeddings: bool) -> List[List[str]]:
    """The trainer's AdamW groups, by name: [decayed, not decayed] — no decay on norms and biases (nor
    on embeddings unless ``decay_embeddings``). Also how a ZeRO-0 bf16/fp16 checkpoint's per-group
    fp32 masters are named again (``runs/ds_files.py``), so the rule lives in one place."""
    decay: List[str] = []
    no_decay: List[str] = []
    for name, shape in shapes:
        is_embedding = "embed" in name or "position" in name
        skip = len(shape) < 2 or "norm" in name.lower() or (is_embedding and not decay_embeddings)
        (no_decay if skip else decay).append(name)
    return [decay, no_decay]


def count_by_component(model: nn.Module) -> dict[str, int]:
    """Parameters per component plus ``total``; shared/tied parameters are counted once."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():  # deduplicated: the tied decoder is counted once
        counts[component_of(name)] += param.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    return counts


def _meta_mlm(mc: ModelConfig) -> nn.Module:
    # Local import: keeps this module importable without transformers' model machinery loaded.
    from .modeling_scale_hyper import build_model

    with torch.device("meta"):  # shapes only: no memory, no init, fast even for large presets
        return build_model(mc, task="mlm")


def parameter_report(mc: ModelConfig) -> dict:
    """Component counts of the MLM model for ``mc`` and of BERT with the same geometry, and the
    deltas against BERT over each of ``DELTA_GROUPS`` (``deltas[group]``: params, baseline, delta, pct)."""
    components = count_by_component(_meta_mlm(mc))
    baseline = count_by_component(_meta_mlm(dataclasses.replace(mc, mixer="bert")))
    delta = components["total"] - baseline["total"]
    deltas = {}
    for group, parts in DELTA_GROUPS.items():
        ours, bert = sum(components[p] for p in parts), sum(baseline[p] for p in parts)
        deltas[group] = {"params": ours, "baseline": bert, "delta": ours - bert, "pct": 100.0 * (ours - bert) / bert}
    return {
        "deltas": deltas,
        "mixer": mc.mixer,
        "components": components,
        "total_params": components["total"],
        "baseline_components": baseline,
        "baseline_params": baseline["total"],
        "delta_params": delta,
        "delta_pct": 100.0 * delta / baseline["total"],
    }


def decay_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """AdamW groups by ``weight_decay_groups``' rule. The trainer's optimizer groups and the planner's
    ZeRO-1/2 partition sizes both come from here. A parameter built partitioned (ZeRO-3) is judged by
    its full shape (``ds_shape``), not by its empty local stand-in."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shapes = ((name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in trainable.items())
    decay, no_decay = weight_decay_groups(shapes, decay_embeddings)
    return [{"params": [trainable[n] for n in decay], "weight_decay": weight_decay},
            {"params": [trainable[n] for n in no_decay], "weight_decay": 0.0}]  # fmt: skip
