"""HyperMixing: the token-mixing MLP whose weights are generated per token.

Shared by the ``hypermixer`` baseline (weights from a per-layer token-wise MLP) and ``hyperbert``
(weights from the shared hypernetwork). Per mixer head k with feature group X_k [B, N, d/H]:

    Y_k = W2_k · act(W1_kᵀ · X_k)        W1_k, W2_k: [B, N, d'/H]

``W1_kᵀ X_k`` is a sum over tokens, so cost and memory are linear in N; no N×N tensor exists.

``kernel`` (ModelConfig.mixer_kernel) may route to the fused Triton kernel in
``scale_hyper.kernels``. This file is also copied next to exported checkpoints, where that package
may be missing: it is imported lazily, and whenever it cannot run the reference path below does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .layers import real_token_count

KERNELS = ("torch", "triton", "auto")
_fused_module: Any = None  # scale_hyper.kernels.hypermixing_triton once imported; False: not importable
_warned: set = set()


def _fused_kernels():
    """The fused-kernel module, or None (e.g. a stand-alone copy of this file without scale_hyper)."""
    global _fused_module
    if _fused_module is None:
        try:
            from scale_hyper.kernels import hypermixing_triton as _fused_module
        except ImportError:
            _fused_module = False
    return _fused_module or None


def _fused_or_none(kernel, x, w1, w2, heads):
    """``fused_hyper_mixing`` when ``kernel`` asks for it and it can run on these inputs, else None.

    "triton" warns once per reason when it cannot run on CUDA tensors; "auto" falls back silently;
    on CPU both fall back silently (unless TRITON_INTERPRET=1 turns the CPU interpreter on).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return None
    fused = _fused_kernels()
    reason = "scale_hyper.kernels is not importable" if fused is None else fused.unsupported_reason(x, w1, w2, heads)
    if reason is None:
        return fused.fused_hyper_mixing
    if kernel == "triton" and x.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mixer_kernel='triton' falls back to the torch path: {reason}", stacklevel=3)
    return None


def hyper_mixing(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    activation: bool = True,
    scale: str = "none",
    kernel: str = "torch",
) -> torch.Tensor:
    """Apply the generated mixer. x [B, N, d], w1/w2 [B, N, d'], mask [B, N] (True = real token).

    activation: GELU between the two generated maps (False = the single generated N×N linear map
    ``W2·(W1ᵀX)``). scale: "none" | "sqrt" | "mean" divides ``W1ᵀX`` by √n or n, n = real tokens.
    kernel: "torch" (this reference code) | "triton" | "auto" (the fused kernel where it can run).
    Returns the concatenated heads [B, N, d] (the caller applies its LayerNorm).
    """
    fused = _fused_or_none(kernel, x, w1, w2, heads)
    if fused is not None:
        return fused(x, w1, w2, heads, mask, activation, scale)
    b, n, d = x.shape
    width = w1.shape[-1]
    if mask is not None:
        # Zeroing pad rows of X, W1 and W2 makes pads invisible to real tokens and their outputs 0.
        keep = mask[..., None].to(x.dtype)
        x, w1, w2 = x * keep, w1 * keep, w2 * keep
    xh = x.reshape(b, n, heads, d // heads)
    w1h = w1.reshape(b, n, heads, width // heads)
    w2h = w2.reshape(b, n, heads, width // heads)

    # W1ᵀX sums N terms, so its magnitude grows with N: accumulate in fp32 even under autocast/bf16.
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 model
    with torch.autocast(device_type=x.device.type, enabled=False):
        hidden = torch.einsum("bnhp,bnhc->bhpc", w1h.to(acc), xh.to(acc))  # [B, H, d'/H, d/H]
        if scale != "none":
            count = real_token_count(mask, b, n, x.device, acc)
            divisor = count.sqrt() if scale == "sqrt" else count
            hidden = hidden / divisor[:, None, None, None]
    hidden = hidden.to(x.dtype)
    if activation:
        hidden = F.gelu(hidden)
    y = torch.einsum("bnhp,bhpc->bnhc", w2h, hidden)
    return y.reshape(b, n, d)
