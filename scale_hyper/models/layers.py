"""Building blocks shared by the encoder and the mixers.

ZeRO-3 rule for every module in this package: a parameter is only ever touched inside the
``forward`` of the module that owns it (DeepSpeed gathers a module's parameters in that module's
forward hooks only). Lookups therefore go through module calls, never through ``.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TiedEmbedding(nn.Embedding):
    """Word embedding that is also the MLM decoder, with one parameter for both.

    Called as a module both times (``emb(ids)`` and ``emb(hidden, decode=True)``) so ZeRO-3's
    hooks gather the weight in both uses.
    """

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        if decode:
            return F.linear(x, self.weight)
        return super().forward(x)


class Embeddings(nn.Module):
    """BERT embeddings: word + learned position + token type, LayerNorm, dropout."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.word_embeddings = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.norm(x))


class FeedForward(nn.Module):
    """Token-wise two-layer MLP with GELU (dropout is applied by the caller's residual)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class HeadwiseLinear(nn.Module):
    """H independent linear maps applied to H feature groups in one einsum.

    Input [..., H, in] -> output [..., H, out]; weight [H, in, out], bias [H, out] (or none).
    ``xavier_gain``: 0 = BERT's normal init (the model's ``_init_weights``); > 0 = xavier-uniform
    with that gain, computed as the official HyperMixer code does (see ``xavier_bound``).
    """

    def __init__(
        self, heads: int, in_features: int, out_features: int, bias: bool = True, xavier_gain: float = 0.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(heads, out_features)) if bias else None
        self.xavier_gain = xavier_gain
        nn.init.normal_(self.weight, std=0.02)

    def xavier_bound(self) -> float:
        """Bound of the uniform init. The official code stores the weight as [H, out, in] and calls
        ``xavier_uniform_`` on that 3-D tensor, so torch takes fan_in = out·in, fan_out = H·in."""
        heads, fan, out = self.weight.shape
        return self.xavier_gain * math.sqrt(6.0 / (out * fan + heads * fan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...hi,hio->...ho", x, self.weight)
        return y if self.bias is None else y + self.bias


def sinusoidal_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sine/cosine table [n, dim] (Vaswani et al.).

    Computed on the fly rather than stored as a buffer: Hugging Face builds models on the meta
    device and would leave a non-persistent buffer uninitialised.
    """
    work = torch.promote_types(dtype, torch.float32)  # at least fp32 even for a bf16 model
    position = torch.arange(n, device=device, dtype=work)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=work) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device, dtype=work)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (rotate-half form) on q, k of shape [B, H, N, head_dim]."""
    n, head_dim = q.shape[-2], q.shape[-1]
    half = head_dim // 2
    work = torch.promote_types(q.dtype, torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, device=q.device, dtype=work) / half))
    angles = torch.arange(n, device=q.device, dtype=work)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(q.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(q.dtype)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t[..., :half], t[..., half : 2 * half]
        rotated = torch.cat([-t2, t1], dim=-1)
        if head_dim % 2:  # odd head size: leave the last feature unrotated
            return torch.cat([t[..., : 2 * half] * cos + rotated * sin, t[..., 2 * half :]], dim=-1)
        return t * cos + rotated * sin

    return rotate(q), rotate(k)


def real_token_count(
    mask: torch.Tensor | None, batch: int, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Number of real (non-pad) tokens per sequence [B] (at least 1)."""
    if mask is None:
        return torch.full((batch,), float(n), device=device, dtype=dtype)
    return mask.sum(dim=1).clamp(min=1).to(dtype)
