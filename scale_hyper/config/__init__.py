"""Run configuration, the lowest layer (imports no other scale_hyper package, no torch):
``model`` (ModelConfig and the field-spec helpers, stdlib only), ``schema`` (the other groups and
RunConfig, each field with a description and its allowed values), ``loading`` (presets, YAML,
overrides, one validation pass) and ``docs`` (``--explain`` and docs/config.md)."""

from scale_hyper.config.loading import ConfigError, available_presets, flatten, load_config, load_saved, to_yaml
from scale_hyper.config.model import MIXERS, ModelConfig
from scale_hyper.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    schema_fields,
)

__all__ = [
    "MIXERS",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "available_presets",
    "flatten",
    "load_config",
    "load_saved",
    "schema_fields",
    "to_yaml",
]
