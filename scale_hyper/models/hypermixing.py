"""HyperMixing: the token-mixing MLP whose weights are generated per token.

Shared by the ``hypermixer`` baseline (weights from a per-layer token-wise MLP) and ``hyperbert``
(weights from the shared hypernetwork). Per mixer head k with feature group X_k [B, N, d/H]:

    Y_k = W2_k · act(W1_kᵀ · X_k)        W1_k, W2_k: [B, N, d'/H]

``W1_kᵀ X_k`` is a sum over tokens, so cost and memory are linear in N; no N×N tensor exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import real_token_count


def hyper_mixing(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    activation: bool = True,
    scale: str = "none",
) -> torch.Tensor:
    """Apply the generated mixer. x [B, N, d], w1/w2 [B, N, d'], mask [B, N] (True = real token).

    activation: GELU between the two generated maps (False = the single generated N×N linear map
    ``W2·(W1ᵀX)``). scale: "none" | "sqrt" | "mean" divides ``W1ᵀX`` by √n or n, n = real tokens.
    Returns the concatenated heads [B, N, d] (the caller applies its LayerNorm).
    """
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
