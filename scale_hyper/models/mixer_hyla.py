"""HYLA baseline ("Attention as a Hypernetwork", ICLR 2025).

Per head h and (query q, key k) pair the attention score is a latent code, not a softmax weight:

    s_h[q,k] = q_h·k_h / √d_k
    a_h[q,k] = s_h[q,k] / sqrt(mean_h s_h[q,k]² + eps)          (RMS norm across heads)
    r[q,k]   = ReLU(Σ_h a_h[q,k] · (W^V_h x_k + b^V_h))           [d/H]
    y_q      = W^O concat_h(Σ_k a_h[q,k] r[q,k]) + b^O

The value network is mixed per pair, so [B, N, N, d/H] values exist in a naive implementation.
Queries are processed in chunks of ``hyla_chunk`` and each chunk is checkpointed (recomputed in
backward), so at most [B, chunk, N, d/H] is alive at once. Pad keys get a = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

HYLA_EPS = 1e-6


def hyla_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One query chunk. q [B, H, C, dh], k/v [B, H, N, dh], key_mask [B, N] bool -> [B, C, H·dh]."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, C, N]
    # The across-head RMS is a mean of squares: take it in fp32 whatever the compute dtype.
    acc = torch.promote_types(s.dtype, torch.float32)
    rms = torch.rsqrt(s.to(acc).pow(2).mean(dim=1, keepdim=True) + HYLA_EPS)
    a = (s.to(acc) * rms).to(s.dtype)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    r = F.relu(torch.einsum("bhcn,bhnd->bcnd", a, v))  # [B, C, N, dh]: the per-pair value network
    z = torch.einsum("bhcn,bcnd->bchd", a, r)  # [B, C, H, dh]
    return z.flatten(2)


class HylaMixer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.chunk = cfg.hyla_chunk
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, hypernet: nn.Module | None = None, layer: int = 0
    ) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        recompute = torch.is_grad_enabled() and q.requires_grad
        chunks = []
        for start in range(0, n, self.chunk):
            q_chunk = q[:, :, start : start + self.chunk]
            if recompute:
                chunks.append(checkpoint(hyla_chunk, q_chunk, k, v, mask, use_reentrant=False))
            else:
                chunks.append(hyla_chunk(q_chunk, k, v, mask))
        return self.out(torch.cat(chunks, dim=1))
