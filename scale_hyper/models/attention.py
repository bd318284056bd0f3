"""Multi-head softmax attention on ``scaled_dot_product_attention`` (flash/efficient kernels on GPU).

Used by the BERT mixer and inside HyperBERT's hypernetwork.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import apply_rotary


def attention_mask_for_sdpa(mask: torch.Tensor | None, n_query: int, causal: bool) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (True = may attend) from a key-padding mask [B, N_k].

    Returns (attn_mask, is_causal). Without padding, causal attention uses SDPA's own flag so the
    flash kernel stays eligible.
    """
    if mask is None:
        return None, causal
    attn_mask = mask[:, None, None, :]  # [B, 1, 1, N_k]
    if causal:
        n_key = mask.shape[1]
        tril = torch.ones(n_query, n_key, dtype=torch.bool, device=mask.device).tril()
        attn_mask = attn_mask & tril
    return attn_mask, False


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention; optional causal mask and rotary positions."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool = False, rotary: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.causal = causal
        self.rotary = rotary
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = apply_rotary(q, k)
        if mask is not None:
            # Pad rows of q, k, v to 0 by a select: SDPA masks with a -inf bias and 0 weights, and
            # NaN + -inf or 0·NaN would carry a non-finite pad row into real tokens (k, v in the
            # forward, q in the backward). Real tokens' outputs are unchanged.
            keep, zero = mask[:, None, :, None], torch.zeros((), dtype=q.dtype, device=q.device)
            q, k, v = (torch.where(keep, t, zero) for t in (q, k, v))
        attn_mask, is_causal = attention_mask_for_sdpa(mask, n, self.causal)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Multi-head attention from x [B, N, d] to a memory [B, M, d] (no padding in the memory)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m = memory.shape[1]
        hd = d // self.heads
        q = self.q(x).view(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv(memory).view(b, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))
