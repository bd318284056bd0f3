"""scale_hyper's model zoo: one BERT encoder skeleton with pluggable token mixers.

Importing this package registers the Hugging Face Auto classes for model_type "scale_hyper".
"""

from .configuration_scale_hyper import ScaleHyperConfig
from .model_config import MIXERS, ModelConfig
from .modeling_scale_hyper import (
    ScaleHyperForMaskedLM,
    ScaleHyperForSequenceClassification,
    ScaleHyperModel,
    ScaleHyperPreTrainedModel,
    build_model,
    register_auto_classes,
)
from .params import count_by_component, parameter_report

register_auto_classes()

__all__ = [
    "MIXERS",
    "ModelConfig",
    "ScaleHyperConfig",
    "ScaleHyperPreTrainedModel",
    "ScaleHyperModel",
    "ScaleHyperForMaskedLM",
    "ScaleHyperForSequenceClassification",
    "build_model",
    "count_by_component",
    "parameter_report",
    "register_auto_classes",
]
