"""Analytic training FLOPs per token, from each mixer's own formula (the DeepSpeed flops profiler
misses custom kernels), and the peak FLOP/s that MFU is measured against. Used by training (MFU in
the logs) and by `scale-hyper bench train`; a new mixer adds its formula to ``_mixer_forward_flops``."""

from __future__ import annotations

from typing import Optional

import torch

from .model_config import ModelConfig


def _mixer_forward_flops(mc: ModelConfig, n: int) -> float:
    """Forward FLOPs of one layer's token mixer, per token (a multiply-add counts 2)."""
    d, heads = mc.hidden_size, mc.effective_mixer_heads
    if mc.mixer == "bert":
        return 2 * 4 * d * d + 2 * 2 * n * d  # QKV+O projections, QKᵀ and AV
    if mc.mixer == "hyla":
        return 2 * 4 * d * d + 2 * 3 * n * d  # Q,K,V,O; scores, first and second value layer mixing
    mixing = 2 * 2 * d * mc.mixer_width / heads  # W1ᵀX and W2·(.)
    if mc.mixer == "hypermixer":
        outputs = 1 if mc.tied_weights else 2
        return mixing + outputs * 2 * (d * d + d * mc.mixer_width) / heads
    # hyperbert: the shared hypernetwork runs once per layer
    dh, ratio = mc.hyper_width, mc.hyper_ffn_ratio
    cross = 2 * 2 * dh * dh if mc.hyper_decoder == "cross" else 0
    block = 2 * 4 * dh * dh + 2 * 2 * n * dh + 2 * 2 * dh * dh * ratio + cross
    outputs = 1 if mc.tied_weights else 2
    return mixing + 2 * d * dh + mc.hyper_layers * block + 2 * dh * outputs * mc.mixer_width


def train_flops_per_token(mc: ModelConfig, seq_len: int, mask_prob: float = 0.15) -> float:
    """fwd + bwd (= 3 × fwd) FLOPs per input token; the vocabulary projection runs on masked tokens only."""
    d = mc.hidden_size
    layer = _mixer_forward_flops(mc, seq_len) + 2 * 2 * d * mc.ffn_size
    head = mask_prob * (2 * d * d + 2 * d * mc.vocab_size)
    return 3 * (mc.num_layers * layer + head)


# Dense peak FLOP/s by device name fragment and precision (vendor datasheets, no sparsity).
_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
}


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of one device, or None where unknown (CPUs): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in _PEAKS.items():
        if key in name:
            return table.get(precision)
    return None
