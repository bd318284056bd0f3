"""HYLA baseline ("Attention as a Hypernetwork", ICLR 2025).

Per head h and (query q, key k) pair the attention score is a latent code, not a softmax weight:

    s_h[q,k] = q_h·k_h / √d_k
    a_h[q,k] = s_h[q,k] / sqrt(mean_h s_h[q,k]² + eps)          (RMS norm across heads)
    r[q,k]   = ReLU(Σ_h a_h[q,k] · (W^V_h x_k + b^V_h))           [d/H]
    y_q      = W^O concat_h(Σ_k a_h[q,k] r[q,k]) + b^O

The value network is mixed per pair, so [B, N, N, d/H] values exist in a naive implementation.
Queries are processed in chunks of ``hyla_chunk`` and each chunk is checkpointed (recomputed in
backward), so at most [B, chunk, N, d/H] is alive at once. Pad keys get a = 0; pad rows of q, k, v
are zeroed first, by selects (NaN·0 = NaN: a multiply would leak a non-finite pad row).

Dropout (``model.dropout``, the probability BERT's attention dropout uses) is applied to the latent
code a, as the official HYLA code does; one draw serves both uses of a.

``hyla_scale=sqrt`` divides each query's sum over keys by √n (n = real keys). Without it the sum
of n terms of random sign grows as √n at initialisation (mixer output RMS ≈ 0.9 / 1.6 / 3.3 at
N = 32 / 128 / 512 at mini width), which swamps the residual in the post-LN skeleton.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import real_token_count

HYLA_EPS = 1e-6


def hyla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    dropout: float = 0.0,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query chunk. q [B, H, C, dh], k/v [B, H, N, dh], key_mask [B, N] bool -> [B, C, H·dh].

    dropout: probability on the latent code a (0 = none); divisor [B] or None: the key sum ÷ it.
    """
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, C, N]
    # The across-head RMS is a mean of squares: take it in fp32 whatever the compute dtype.
    acc = torch.promote_types(s.dtype, torch.float32)
    rms = torch.rsqrt(s.to(acc).pow(2).mean(dim=1, keepdim=True) + HYLA_EPS)
    a = (s.to(acc) * rms).to(s.dtype)
    if key_mask is not None:
        a = torch.where(key_mask[:, None, None, :], a, torch.zeros((), dtype=a.dtype, device=a.device))
    if dropout:
        a = F.dropout(a, dropout, training=True)
    r = F.relu(torch.einsum("bhcn,bhnd->bcnd", a, v))  # [B, C, N, dh]: the per-pair value network
    z = torch.einsum("bhcn,bcnd->bchd", a, r)  # [B, C, H, dh]
    if divisor is not None:
        z = z / divisor[:, None, None, None].to(z.dtype)
    return z.flatten(2)


class HylaMixer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.chunk = cfg.hyla_chunk
        self.dropout = cfg.dropout
        self.scale = getattr(cfg, "hyla_scale", "none")
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, hypernet: nn.Module | None = None, layer: int = 0
    ) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if mask is not None:
            # Pad rows of q, k, v to 0 by a select, so a non-finite pad row reaches no real token,
            # in the forward (k, v) nor the backward (q: its scores' gradients meet every key).
            keep, zero = mask[:, None, :, None], torch.zeros((), dtype=q.dtype, device=q.device)
            q, k, v = (torch.where(keep, t, zero) for t in (q, k, v))
        divisor = real_token_count(mask, b, n, x.device, torch.float32).sqrt() if self.scale == "sqrt" else None
        dropout = self.dropout if self.training else 0.0
        recompute = torch.is_grad_enabled() and q.requires_grad
        chunks = []
        for start in range(0, n, self.chunk):
            q_chunk = q[:, :, start : start + self.chunk]
            if recompute:
                # Checkpointing preserves the RNG state, so the recomputed dropout mask is the same.
                chunks.append(checkpoint(hyla_chunk, q_chunk, k, v, mask, dropout, divisor, use_reentrant=False))
            else:
                chunks.append(hyla_chunk(q_chunk, k, v, mask, dropout, divisor))
        return self.out(torch.cat(chunks, dim=1))
