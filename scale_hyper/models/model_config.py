"""Model geometry and mixer choices: the one definition shared by the omegaconf schema,
the Hugging Face config and the model code.

Plain dataclass on purpose: this file travels with exported checkpoints (``trust_remote_code``),
so it must import nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MIXERS = ("bert", "hyperbert", "hypermixer", "hyla")


@dataclass
class ModelConfig:
    # --- encoder skeleton (BERT geometry) ---
    mixer: str = "hyperbert"  # token mixer: bert | hyperbert | hypermixer | hyla
    vocab_size: int = 30522
    hidden_size: int = 256  # d
    num_layers: int = 4  # L
    num_heads: int = 4  # attention heads (bert, hyla) and default mixer heads
    ffn_size: int = 1024
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    norm_position: str = "post"  # post (BERT) | pre
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    # --- shared hypernetwork (hyperbert) ---
    hyper_width: int = 128  # O4: d_h
    hyper_layers: int = 2
    hyper_heads: int = 4
    hyper_ffn_ratio: int = 2  # O4: r_h
    mixer_width: int = 256  # O4: d' (also hypermixer's d')
    hyper_condition: str = "hidden+layer"  # O1: hidden+layer | hidden | layer
    hyper_mlp: str = "mlp"  # O2: mlp (W2·GELU(W1ᵀX)) | linear (W2·(W1ᵀX), one generated N×N map)
    hyper_decoder: str = "bidirectional"  # O3: bidirectional | causal | cross
    tied_weights: bool = False  # O5: W2 = W1 (hyperbert and hypermixer)
    mixer_scale: str = "none"  # O6: none | sqrt (1/√N) | mean (1/N) scaling of W1ᵀX
    mixer_kernel: str = "torch"  # torch (reference) | triton (fused kernel, CUDA; falls back to torch elsewhere) | auto (triton on CUDA when installed)
    mixer_heads: int = 0  # O7: 0 = num_heads
    hyper_input_norm: bool = False  # O8: feed LN(x_l) instead of x_l
    hyper_position: str = "learned"  # O8: learned | sinusoidal | rotary

    # --- cross-layer sharing (any mixer) ---
    share_mixers: int = 0  # 0 = each layer its own mixer; k = k mixers shared by the L layers
    share_order: str = "cycle"  # cycle (layer i uses mixer i mod k) | stretch (mixer floor(i*k/L))

    # --- hyla ---
    hyla_chunk: int = 128  # queries per chunk: bounds memory at O(chunk·N·d/H)

    def validate(self) -> ModelConfig:
        """Fail early, naming the field and the valid choices."""
        choices = {
            "mixer": MIXERS,
            "norm_position": ("post", "pre"),
            "hyper_condition": ("hidden+layer", "hidden", "layer"),
            "hyper_mlp": ("mlp", "linear"),
            "hyper_decoder": ("bidirectional", "causal", "cross"),
            "mixer_scale": ("none", "sqrt", "mean"),
            "mixer_kernel": ("torch", "triton", "auto"),
            "hyper_position": ("learned", "sinusoidal", "rotary"),
            "share_order": ("cycle", "stretch"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        heads = self.effective_mixer_heads
        generated = self.mixer in ("hyperbert", "hypermixer")
        if self.hidden_size % heads or (generated and self.mixer_width % heads):
            raise ValueError(
                f"model.hidden_size={self.hidden_size} and model.mixer_width={self.mixer_width} "
                f"must be divisible by the mixer heads ({heads})"
            )
        if not 0 <= self.share_mixers <= self.num_layers:
            raise ValueError(
                f"model.share_mixers={self.share_mixers} must be between 0 (no sharing) and model.num_layers={self.num_layers}"
            )
        if self.mixer == "hyperbert" and self.hyper_width % self.hyper_heads:
            raise ValueError(
                f"model.hyper_width={self.hyper_width} must be divisible by model.hyper_heads={self.hyper_heads}"
            )
        return self

    @property
    def effective_mixer_heads(self) -> int:
        return self.mixer_heads or self.num_heads

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
