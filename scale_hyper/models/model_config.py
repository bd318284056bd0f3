"""Re-export of ``scale_hyper.config.model`` (config is the lowest layer; models import it). Kept so
``from .model_config import ModelConfig`` works both here and in exported directories, where
``save_pretrained`` writes the standalone, stdlib-only ``scale_hyper/config/model.py`` under this name."""

from scale_hyper.config.model import MIXERS, ConfigError, ModelConfig  # noqa: F401
