"""HyperMixer baseline (Mai et al., ACL 2023): per-layer HyperMixing, no Q/K/V/O matrices.

Per layer, the hypernetwork input is ``x·√d + sinusoidal PE`` (positions enter only here); per
mixer head k a token-wise MLP ``d/H -> d/H -> d'/H`` (GELU) yields the rows of W1 (a second one
yields W2 unless ``tied_weights``). ``Y = LN(concat_k W2_k · GELU(W1_kᵀ X_k))``.

Switches honoured: ``mixer_width`` (d'), ``mixer_heads``, ``tied_weights``, ``mixer_scale``,
``hypermixer_mlp`` ("bert": the weight-generating MLPs have biases and BERT's normal init, like
every other layer here; "official": no biases and xavier-uniform init with gain √2, as the official
idiap/hypermixing code). The ``hyper_*`` switches belong to HyperBERT's shared hypernetwork.

Positions differ from the official code (docs/engine.md, "Models"): ours is the standard sinusoidal
table from position 0; the official one starts at position 1 and its frequencies decay twice as fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hypermixing import hyper_mixing
from .layers import HeadwiseLinear, sinusoidal_positions


class HeadwiseMLP(nn.Module):
    """H token-wise MLPs ``in -> hidden -> out`` (GELU), batched over heads with einsum."""

    def __init__(self, heads: int, in_features: int, hidden: int, out_features: int, official: bool = False) -> None:
        super().__init__()
        bias, gain = (False, math.sqrt(2.0)) if official else (True, 0.0)
        self.fc1 = HeadwiseLinear(heads, in_features, hidden, bias=bias, xavier_gain=gain)
        self.fc2 = HeadwiseLinear(heads, hidden, out_features, bias=bias, xavier_gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class HyperMixerMixer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.heads = cfg.effective_mixer_heads
        self.scale = cfg.mixer_scale
        self.kernel = getattr(cfg, "mixer_kernel", "torch")
        group = cfg.hidden_size // self.heads
        width = cfg.mixer_width // self.heads
        official = getattr(cfg, "hypermixer_mlp", "bert") == "official"
        self.w1_net = HeadwiseMLP(self.heads, group, group, width, official)
        # Tied: W2 is the same tensor as W1 (the official code's tied path crashes; this one is plain).
        self.w2_net = None if cfg.tied_weights else HeadwiseMLP(self.heads, group, group, width, official)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, hypernet: nn.Module | None = None, layer: int = 0
    ) -> torch.Tensor:
        b, n, d = x.shape
        hyper_in = x * math.sqrt(d) + sinusoidal_positions(n, d, x.device, x.dtype)
        hyper_in = hyper_in.view(b, n, self.heads, d // self.heads)
        w1 = self.w1_net(hyper_in).reshape(b, n, -1)
        w2 = w1 if self.w2_net is None else self.w2_net(hyper_in).reshape(b, n, -1)
        y = hyper_mixing(x, w1, w2, self.heads, mask, activation=True, scale=self.scale, kernel=self.kernel)
        return self.norm(y)
