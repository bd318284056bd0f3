"""HyperMixing: the token-mixing MLP whose weights are generated per token.

Shared by the ``hypermixer`` baseline (weights from a per-layer token-wise MLP) and ``hyperbert``
(weights from the shared hypernetwork). Per mixer head k with feature group X_k [B, N, d/H]:

    Y_k = W2_k · act(W1_kᵀ · X_k)        W1_k, W2_k: [B, N, d'/H]

``W1_kᵀ X_k`` is a sum over tokens, so cost and memory are linear in N; no N×N tensor exists.

``kernel`` (ModelConfig.mixer_kernel) may route to the fused Triton kernel in
``scale_hyper.kernels``. ``auto`` is lenient: the kernel where it can run, else the reference path.
``triton`` is strict on CUDA tensors: a shape/dtype the kernel cannot take (or no Triton) is a user
error saying why; on CPU tensors (the kernel is CUDA-only) it runs the reference, so a checkpoint
trained with ``triton`` still evaluates on CPU. The path chosen is logged once per process and
reason. This file is also copied next to exported checkpoints, where ``scale_hyper.kernels`` may be
missing: it is imported lazily.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .layers import real_token_count
from .model_config import ConfigError

KERNELS = ("torch", "triton", "auto")
_fused_module: Any = None  # scale_hyper.kernels.hypermixing_triton once imported; False: not importable
_logged: set = set()  # (kernel, path) pairs already logged: the choice is reported once per process
log = logging.getLogger(__name__)


def _fused_kernels():
    """The fused-kernel module, or None (e.g. a stand-alone copy of this file without scale_hyper)."""
    global _fused_module
    if _fused_module is None:
        try:
            from scale_hyper.kernels import hypermixing_triton as _fused_module
        except ImportError:
            _fused_module = False
    return _fused_module or None


def _log_once(kernel: str, path: str) -> None:
    # Under torch.compile the choice is fixed while tracing; a logger call there would split the
    # graph (TorchDynamo breaks on logging.Logger methods), so only eager calls report it.
    if (kernel, path) not in _logged and not torch.compiler.is_compiling():
        _logged.add((kernel, path))
        log.info("model.mixer_kernel=%s: HyperMixing runs %s", kernel, path)


def _fused_or_none(kernel, x, w1, w2, heads):
    """``fused_hyper_mixing`` when ``kernel`` asks for it and it can run on these inputs, else None.

    "auto" falls back to the reference whenever the kernel cannot run. "triton" raises a
    ConfigError (a user error) when it cannot run on CUDA tensors, and runs the reference on CPU
    tensors unless TRITON_INTERPRET=1 turns the CPU interpreter on (then it is strict there too).
    Both take the reference where the kernel could run but is not the better route
    (``reference_route_reason``: fp32 on a GPU without TF32, as evaluation and GLUE run; a geometry
    without a spill-free launch on this GPU), so a model trained with ``triton`` evaluates in fp32
    without an error.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return None
    fused = _fused_kernels()
    reason = "scale_hyper.kernels is not importable" if fused is None else fused.unsupported_reason(x, w1, w2, heads)
    if reason is None:
        slower = fused.reference_route_reason(x, w1, w2, heads)  # supported, but the reference is the better route
        if slower is None:
            _log_once(kernel, "the fused Triton kernel")
            return fused.fused_hyper_mixing
        _log_once(kernel, f"the torch reference ({slower})")
        return None
    interpreted = fused is not None and fused.interpreting()
    if kernel == "triton" and (x.is_cuda or interpreted):
        shapes = f"x {tuple(x.shape)} {x.dtype}, w1/w2 {tuple(w1.shape)}, heads={heads}"
        raise ConfigError(
            f"model.mixer_kernel=triton cannot run the fused kernel on {shapes}: {reason}"
            " — set model.mixer_kernel=auto (falls back to torch where the kernel cannot run) or torch"
        )
    _log_once(kernel, f"the torch reference ({reason})")
    return None


def zero_pads(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pad rows of each [B, N, ·] tensor set to 0, so pads are invisible to real tokens and their
    outputs are 0. A select, not ``t * mask``: NaN·0 = NaN would leak a non-finite pad row into every
    real token's W1ᵀX (its gradient is a select too, 0 for pads)."""
    keep = mask[..., None].to(torch.bool)
    return tuple(torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors)


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
        x, w1, w2 = zero_pads(mask, x, w1, w2)
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
