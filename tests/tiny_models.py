"""The small model geometry the model tests share (fast on CPU, every mixer valid)."""

from scale_hyper.models import ModelConfig


def tiny_config(mixer: str = "hyperbert", **overrides) -> ModelConfig:
    values = dict(
        mixer=mixer, vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
        max_position=64, hyper_width=8, hyper_heads=2, mixer_width=12,
    )  # fmt: skip
    values.update(overrides)
    return ModelConfig(**values).validate()
