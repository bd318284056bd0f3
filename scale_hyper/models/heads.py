"""Task heads: masked-LM (decoder tied to the word embeddings) and sequence classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TiedEmbedding


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LN -> decoder (the word embedding, called as a module) + own bias."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: TiedEmbedding) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))
        # The embedding is not a child of this head (it would be saved twice): it is passed in and
        # called as a module, so ZeRO-3 gathers its weight for the decode too.
        return word_embeddings(h, decode=True) + self.bias


class ClassificationHead(nn.Module):
    """BERT pooler (dense + tanh on [CLS]) -> dropout -> linear to num_labels."""

    def __init__(self, cfg, num_labels: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(sequence_output[:, 0]))
        return self.classifier(self.dropout(pooled))
