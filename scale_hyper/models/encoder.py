"""The BERT-style encoder skeleton shared by every mixer: L blocks of mixer + FFN.

post-LN (BERT): x = LN(x + mixer(x)); x = LN(x + FFN(x))
pre-LN:         x = x + mixer(LN(x)); x = x + FFN(LN(x)); a final LN after the last block
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .construction import build_shared
from .layers import FeedForward
from .mixer_bert import BertMixer
from .mixer_hyla import HylaMixer
from .mixer_hyper import HyperBertMixer, HyperNetwork
from .mixer_hypermixer import HyperMixerMixer

MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "bert": BertMixer,
    "hyperbert": HyperBertMixer,
    "hypermixer": HyperMixerMixer,
    "hyla": HylaMixer,
}


def mixer_map(num_layers: int, mixers: int, order: str = "cycle") -> list[int]:
    """Which of ``mixers`` shared mixers each of ``num_layers`` layers uses.

    cycle: layer i -> i mod k (ALBERT-style repetition of the whole stack);
    stretch: layer i -> floor(i·k / L) (each mixer repeated in place).
    """
    if order == "cycle":
        return [i % mixers for i in range(num_layers)]
    if order == "stretch":
        return [i * mixers // num_layers for i in range(num_layers)]
    raise ValueError(f"order={order!r} is not one of cycle, stretch")


def build_mixer(cfg) -> nn.Module:
    if cfg.mixer not in MIXER_CLASSES:
        raise ValueError(f"model.mixer={cfg.mixer!r} is not one of {', '.join(MIXER_CLASSES)}")
    return MIXER_CLASSES[cfg.mixer](cfg)


class EncoderBlock(nn.Module):
    """One layer. Every mixer has the signature ``mixer(x, mask, hypernet=None, layer=0)``."""

    def __init__(self, cfg, own_mixer: bool = True) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        # Without its own mixer the block is handed one of the encoder's shared mixers per call.
        self.mixer = build_mixer(cfg) if own_mixer else None
        self.mixer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        hypernet: nn.Module | None = None,
        layer: int = 0,
        mixer: nn.Module | None = None,
    ) -> torch.Tensor:
        mixer = mixer if mixer is not None else self.mixer
        if self.pre_norm:
            x = x + self.dropout(mixer(self.mixer_norm(x), mask, hypernet=hypernet, layer=layer))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.mixer_norm(x + self.dropout(mixer(x, mask, hypernet=hypernet, layer=layer)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """The block stack; owns HyperBERT's shared hypernetwork (``encoder.hypernet``) when used."""

    def __init__(self, cfg) -> None:
        super().__init__()
        # Registered here, once: blocks only receive it as an argument, so its parameters appear
        # once in state_dict() and ZeRO-3 sees a single module called L times. build_shared lets a
        # trainer keep it whole on every rank while it partitions the rest (construction.py).
        self.hypernet = build_shared(lambda: HyperNetwork(cfg)) if cfg.mixer == "hyperbert" else None
        # model.share_mixers=k: k mixers owned here and shared across the L layers (cross-layer
        # sharing, e.g. a transplanted model trained at a fixed mixing-parameter budget). Owned by
        # the encoder like the hypernetwork, so each parameter exists once everywhere.
        share = getattr(cfg, "share_mixers", 0)
        self.shared_mixers = (
            build_shared(lambda: nn.ModuleList(build_mixer(cfg) for _ in range(share))) if share else None
        )
        self.mixer_of_layer = mixer_map(cfg.num_layers, share, getattr(cfg, "share_order", "cycle")) if share else None
        self.layers = nn.ModuleList(EncoderBlock(cfg, own_mixer=not share) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_position == "pre" else None
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = bool(enabled)

    def shared_modules(self) -> list[nn.Module]:
        """Modules used by several layers (kept resident under ZeRO-3)."""
        shared = [self.hypernet] if self.hypernet is not None else []
        return shared + (list(self.shared_mixers) if self.shared_mixers is not None else [])

    def mixer(self, layer: int) -> nn.Module:
        """The mixer layer ``layer`` uses (its own, or a shared one)."""
        if self.shared_mixers is not None:
            return self.shared_mixers[self.mixer_of_layer[layer]]
        return self.layers[layer].mixer

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden_states = (x,) if output_hidden_states else None
        for i, block in enumerate(self.layers):
            mixer = self.mixer(i)
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant only: the reentrant variant breaks the shared hypernetwork's
                # gradients under ZeRO-2/3 (it is reached from several checkpointed regions).
                x = checkpoint(block, x, mask, self.hypernet, i, mixer, use_reentrant=False)
            else:
                x = block(x, mask, hypernet=self.hypernet, layer=i, mixer=mixer)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, hidden_states
