"""The BERT baseline's token mixer: bidirectional multi-head softmax attention."""

from __future__ import annotations

import torch
from torch import nn

from .attention import SelfAttention


class BertMixer(SelfAttention):
    """Fused QKV + ``scaled_dot_product_attention`` with a key-padding mask, output projection."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, hypernet: nn.Module | None = None, layer: int = 0
    ) -> torch.Tensor:
        return super().forward(x, mask)
