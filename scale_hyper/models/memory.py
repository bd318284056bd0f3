"""What training a model costs per rank, analytically: model state by ZeRO stage, activations, the
peak while the model is built, the weights ZeRO-3 keeps gathered, and the bytes its collectives move.

Used by `scale-hyper plan` (``engine/planner.py``), by the trainer's "does not fit even fully
partitioned" refusal (``engine/fit.py``) and by the doctor's memory row; it lives here, below all of
them. Model state follows DeepSpeed 0.19.8's partitioning parameter by parameter: ZeRO-1/2 flatten
each optimizer group, pad it to a multiple of 2 × world and give each rank one slice; ZeRO-3 gives
each parameter its own ⌈numel / world⌉ slice and keeps small parameters
(< ``deepspeed.param_persistence_threshold``) and the resident shared modules whole on every rank.
Activations are analytic (see ``activation_bytes``). Imports torch and the model code (parameter
counts on the meta device), never DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any, Dict

from scale_hyper.config import RunConfig

# DeepSpeed 0.19.8's ZeRO-3 defaults (stage3_max_reuse_distance, stage3_max_live_parameters): a weight
# used again within this many gathered elements is not released in between (forward → backward).
REUSE_DISTANCE = 1_000_000_000


def parameter_layout(run: RunConfig) -> Dict[str, Any]:
    """Per-parameter sizes, optimizer groups, ZeRO-3 persistence and the largest module, from the model
    built on the meta device."""
    import torch

    from .modeling_scale_hyper import build_model
    from .params import decay_groups

    with torch.device("meta"):
        model = build_model(run.model, task="mlm")
    shared = {id(p) for m in model.shared_modules() for p in m.parameters()}
    resident = shared if run.deepspeed.hypernet_resident else set()
    groups = decay_groups(model, run.train.weight_decay, run.train.decay_embeddings)
    threshold = run.deepspeed.param_persistence_threshold
    persistent = [p.numel() for p in model.parameters() if p.numel() < threshold or id(p) in resident]
    modules = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "numels": [p.numel() for p in model.parameters()],
        "group_numels": [sum(p.numel() for p in g["params"]) for g in groups if g["params"]],
        "persistent_numels": persistent,
        "shared_numel": sum(p.numel() for p in model.parameters() if id(p) in shared),
        "resident": bool(resident),
        "largest_module_numel": max(modules),
        "layers": run.model.num_layers,
    }


def weight_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(
    layout: Dict[str, Any], stage: int, world: int, precision: str, accumulation: int
) -> Dict[str, int]:
    """Bytes of weights, gradients, fp32 master copy and Adam moments one rank holds (see the module docstring)."""
    psi = layout["params"]
    half = precision in ("bf16", "fp16")
    wb = weight_bytes(precision)

    def flat_partition(n: int) -> int:  # ZeRO-1/2: a group padded to a multiple of 2 × world, one slice per rank
        return math.ceil(n / (2 * world)) * 2

    zero12 = sum(flat_partition(n) for n in layout["group_numels"])
    zero3 = sum(math.ceil(n / world) for n in layout["numels"])
    if stage == 0:
        own = psi if not half else zero12  # bf16 ZeRO-0: DeepSpeed's BF16_Optimizer partitions the fp32 state too
        return {"weights": psi * wb, "gradients": psi * wb + (psi * 4 if half else 0),
                "master": own * 4 if half else 0, "adam": own * 8}  # fmt: skip
    if stage in (1, 2):
        full_grads = stage == 1 and accumulation > 1  # ZeRO-1 reduces only at the accumulation boundary
        return {"weights": zero12 * world * wb, "gradients": (max(psi, zero12) if full_grads else zero12) * wb,
                "master": zero12 * 4, "adam": zero12 * 8}  # fmt: skip
    resident = sum(layout["persistent_numels"])
    return {"weights": (zero3 + resident) * wb, "gradients": zero3 * wb, "master": zero3 * 4, "adam": zero3 * 8}


def gathered_bytes(layout: Dict[str, Any], stage: int, precision: str, reuse_distance: int = REUSE_DISTANCE) -> int:
    """ZeRO-3: full copies of partitioned weights held during forward and backward. DeepSpeed keeps a
    gathered weight until its next use unless more than ``reuse_distance`` elements are gathered in
    between, so a model below that window is whole on every rank from forward through backward."""
    if stage != 3:
        return 0
    partitioned = layout["params"] - sum(layout["persistent_numels"])
    return min(partitioned, reuse_distance) * weight_bytes(precision)


def build_peak_bytes(layout: Dict[str, Any], world: int, precision: str, partitioned: bool) -> int:
    """Parameter bytes one rank holds at the peak of building the model (before deepspeed.initialize).

    Whole: every parameter, in fp32 (torch's default dtype; DeepSpeed casts later). Partitioned
    (deepspeed.zero.Init): this rank's slices in the training precision, the resident shared modules
    whole, and two full copies of one module while it is initialised (the largest: the word embeddings;
    measured: its own tensors and the gather zero.Init makes around its initialisation)."""
    if not partitioned:
        return layout["params"] * 4
    wb = weight_bytes(precision)
    slices = sum(math.ceil(n / world) for n in layout["numels"])
    shared = layout["shared_numel"] if layout["resident"] else 0
    return (slices + shared + 2 * layout["largest_module_numel"]) * wb


def zero3_comm_bytes(layout: Dict[str, Any], precision: str, resident: bool) -> Dict[str, int]:
    """Logical bytes of ZeRO-3's collectives per optimizer step (one micro batch), first order, with
    every weight released after use (a model far beyond DeepSpeed's reuse window): each partitioned
    weight is all-gathered for forward and again for backward; the shared modules at each of their
    2·L uses when partitioned, once (after the step) when resident; every gradient is
    reduce-scattered once. A ring moves (W − 1)/W of each through every rank's link."""
    wb = weight_bytes(precision)
    shared = layout["shared_numel"]
    others = layout["params"] - shared
    gathered = 2 * others + (1 if resident else 2 * layout["layers"]) * shared
    return {"all_gather": gathered * wb, "reduce_scatter": layout["params"] * wb}


def activation_bytes(run: RunConfig, micro: int, checkpointing: bool, precision: str) -> int:
    """Analytic activation memory of one micro batch: per layer and token, 34·d bytes in 16-bit
    (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models":
    attention block 11·d, MLP 19·d, two LayerNorms 4·d; no s² term, since SDPA's flash/memory-efficient
    kernels keep no attention matrix), plus the mixer's own tensors (the hypernetwork's layers at width
    d_h and the generated W1, W2 for hyperbert; W1, W2 for hypermixer), the embeddings and the sparse
    MLM head; with activation checkpointing only each block's input is kept, plus one block
    recomputed in backward. fp32 doubles every count."""
    mc, s, b = run.model, run.data.seq_len, micro
    d, L = mc.hidden_size, mc.num_layers
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0  # the counts are for 16-bit activations
    layer = 34 * d
    if mc.mixer == "hyperbert":
        layer += mc.hyper_layers * 34 * mc.hyper_width + 4 * 2 * mc.mixer_width  # hypernetwork layers, W1/W2
    elif mc.mixer == "hypermixer":
        layer += 4 * 2 * mc.mixer_width + 4 * d
    head = mc.vocab_size * 6 * run.data.mask_prob + 4 * d  # sparse logits (16-bit + fp32 for the loss), transform
    embed = 5 * d
    per_token = (2 * d * L + layer) if checkpointing else layer * L
    return int(s * b * (per_token + head + embed) * scale)


def offloaded_bytes(run: RunConfig, state: Dict[str, int], layout: Dict[str, Any], stage: int, world: int,
                    precision: str) -> int:  # fmt: skip
    """Model-state bytes that offloading moves off the device: the fp32 master and Adam moments
    (offload_optimizer, ZeRO-1–3), and under ZeRO-3 the weight partitions (offload_param; persistent
    weights stay on the device)."""
    out = state["master"] + state["adam"] if run.deepspeed.offload_optimizer and stage else 0
    if run.deepspeed.offload_param and stage == 3:
        out += sum(math.ceil(n / world) for n in layout["numels"]) * weight_bytes(precision)
    return out


def rank_bytes(run: RunConfig, layout: Dict[str, Any], stage: int, world: int, precision: str, micro: int,
               accumulation: int, host: bool = False) -> Dict[str, Any]:  # fmt: skip
    """One rank's memory in training, by part: model state, what offloading moves off the device (not
    off a CPU rank: ``host``, unless to NVMe), the reduce bucket, ZeRO-3's gathered weights and the
    activations of one micro batch (with and without checkpointing); ``total`` for the configured
    ``train.activation_checkpointing``."""
    state = model_state_bytes(layout, stage, world, precision, accumulation)
    offloaded = offloaded_bytes(run, state, layout, stage, world, precision)
    if host and run.deepspeed.offload_device != "nvme":
        offloaded = 0  # CPU offload on a CPU rank moves nothing out of its memory
    reuse = dict(run.deepspeed.extra).get("zero_optimization", {}).get("stage3_max_reuse_distance", REUSE_DISTANCE)
    gathered = gathered_bytes(
        layout, stage, precision, int(reuse) if isinstance(reuse, (int, float)) else REUSE_DISTANCE
    )
    bucket = run.deepspeed.reduce_bucket_size * weight_bytes(precision) if stage else 0
    act = {
        "plain": activation_bytes(run, micro, False, precision),
        "checkpointing": activation_bytes(run, micro, True, precision),
    }
    fixed = sum(state.values()) - offloaded + gathered + bucket
    ckpt = run.train.activation_checkpointing != "none"
    return {"state": state, "offloaded": offloaded, "gathered": gathered, "bucket": bucket, "activations": act,
            "fixed": fixed, "total": fixed + act["checkpointing" if ckpt else "plain"]}  # fmt: skip
