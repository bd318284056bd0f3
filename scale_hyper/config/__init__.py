"""Run configuration: structured dataclasses (schema) and how they are loaded (loading)."""

from scale_hyper.config.loading import ConfigError, available_presets, flatten, load_config, to_yaml
from scale_hyper.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "available_presets",
    "flatten",
    "load_config",
    "to_yaml",
]
