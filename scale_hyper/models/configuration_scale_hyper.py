"""Hugging Face configuration for scale_hyper models.

Carries every ``ModelConfig`` field under the same name and default (tests check the two stay in
step), plus the usual Hugging Face fields (num_labels, problem_type, ...). Copied next to exported
checkpoints, so it imports only transformers and its sibling ``model_config.py`` — in an export, the
standalone definition (``write_standalone_model_config``); in the package, a re-export of
``scale_hyper.config.model``.
"""

import inspect
import os
import sys
from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from .model_config import ModelConfig


def write_standalone_model_config(directory) -> None:
    """Overwrite the ``model_config.py`` that ``save_pretrained`` copied into ``directory`` with the
    source of the module that defines ModelConfig (``scale_hyper/config/model.py``, stdlib only; in an
    export, the export's own copy), so the export loads with ``trust_remote_code`` and no scale_hyper."""
    path = os.path.join(directory, "model_config.py")
    if os.path.isfile(path):
        source = inspect.getsource(sys.modules[ModelConfig.__module__])
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)


@strict
class ScaleHyperConfig(PretrainedConfig):
    model_type = "scale_hyper"
    # Standard Hugging Face names, so generic utilities find the geometry.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "ffn_size",
        "max_position_embeddings": "max_position",
        "hidden_dropout_prob": "dropout",
    }

    # --- encoder skeleton ---
    mixer: str = "hyperbert"
    vocab_size: int = 30522
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int = 1024
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float | int = 0.1
    norm_position: str = "post"
    layer_norm_eps: float | int = 1e-12
    initializer_range: float | int = 0.02
    pad_token_id: int | None = 0

    # --- shared hypernetwork (hyperbert) ---
    hyper_width: int = 128
    hyper_layers: int = 2
    hyper_heads: int = 4
    hyper_ffn_ratio: int = 2
    mixer_width: int = 256
    hyper_condition: str = "hidden+layer"
    hyper_mlp: str = "mlp"
    hyper_decoder: str = "bidirectional"
    tied_weights: bool = False
    mixer_scale: str = "none"
    mixer_kernel: str = "torch"
    mixer_heads: int = 0
    hyper_input_norm: bool = False
    hyper_position: str = "learned"

    # --- cross-layer sharing ---
    share_mixers: int = 0
    share_order: str = "cycle"

    # --- hyla ---
    hyla_chunk: int = 128
    hyla_scale: str = "none"

    # --- hypermixer ---
    hypermixer_mlp: str = "bert"

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_standalone_model_config(save_directory)
        return out

    def validate_model_config(self) -> None:
        """Run ModelConfig's checks (called by the strict-dataclass validation of transformers)."""
        self.to_model_config().validate()

    @classmethod
    def from_model_config(cls, mc: ModelConfig, **hf_kwargs) -> "ScaleHyperConfig":
        return cls(**mc.to_dict(), **hf_kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})


__all__ = ["ScaleHyperConfig", "write_standalone_model_config"]
