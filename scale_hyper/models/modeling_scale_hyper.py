"""Hugging Face model classes for scale_hyper (BERT, HyperBERT, HyperMixer, HYLA encoders).

Copied next to exported checkpoints by ``save_pretrained`` (``trust_remote_code``): it imports
only torch, transformers and sibling files through single-level relative imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .configuration_scale_hyper import ScaleHyperConfig, write_standalone_model_config
from .encoder import Encoder
from .heads import ClassificationHead, MaskedLMHead
from .layers import Embeddings, HeadwiseLinear
from .model_config import ModelConfig


class ScaleHyperPreTrainedModel(PreTrainedModel):
    config_class = ScaleHyperConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT init: normal(0, initializer_range) weights, zero biases, LayerNorm ones/zeros."""
        std = self.config.initializer_range
        if isinstance(module, HeadwiseLinear) and module.xavier_gain:
            bound = module.xavier_bound()  # hypermixer_mlp=official: the official HyperMixer init
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, (nn.Linear, HeadwiseLinear)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MaskedLMHead):
            init.zeros_(module.bias)

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self) -> None:
        """transformers' initialisation, in its order (children first), but through ``nn.Module.apply``:
        a construction context that partitions parameters across ranks (the training engine's, under
        ZeRO-3) wraps ``apply`` to gather each module's weights around the call, so a partitioned build
        draws the same weights from the same seed as a whole one. Our models nest no PreTrainedModel
        with another ``_init_weights``, so one function serves every module."""
        custom = self.is_custom_code()
        self.apply(lambda module: self._initialize_weights(module, custom))

    # --- conventions the training engine relies on ---
    def _backbone(self) -> ScaleHyperModel:
        return self if isinstance(self, ScaleHyperModel) else self.model

    def shared_modules(self) -> list[nn.Module]:
        """Modules shared by all layers (HyperBERT's hypernetwork): kept replicated under ZeRO-3."""
        return self._backbone().encoder.shared_modules()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self._backbone().encoder.set_activation_checkpointing(enabled)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        # Hugging Face's entry point (Trainer etc.): always the non-reentrant per-block variant.
        self.set_activation_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.set_activation_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._backbone().encoder.activation_checkpointing

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One exported folder serves every Auto class, whichever head was saved.
        modeling = type(self).__module__.rsplit(".", 1)[-1]
        configuration = type(self.config).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            "AutoConfig": f"{configuration}.{type(self.config).__name__}",
            "AutoModel": f"{modeling}.ScaleHyperModel",
            "AutoModelForMaskedLM": f"{modeling}.ScaleHyperForMaskedLM",
            "AutoModelForSequenceClassification": f"{modeling}.ScaleHyperForSequenceClassification",
        }
        out = super().save_pretrained(save_directory, *args, **kwargs)
        # The copied model_config.py is a re-export shim inside scale_hyper: replace it by the standalone one.
        write_standalone_model_config(save_directory)
        return out


class ScaleHyperModel(ScaleHyperPreTrainedModel):
    """Embeddings + encoder; returns the final hidden states."""

    def __init__(self, config: ScaleHyperConfig) -> None:
        super().__init__(config)
        mc = config.to_model_config()
        self.embeddings = Embeddings(mc)
        self.encoder = Encoder(mc)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """attention_mask [B, N]: 1 = real token, 0 = pad. Passing None for an unpadded batch lets
        BERT use the flash kernel."""
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        mask = attention_mask.bool() if attention_mask is not None else None
        x = self.embeddings(input_ids, token_type_ids)
        x, hidden_states = self.encoder(x, mask, output_hidden_states=bool(output_hidden_states))
        if not return_dict:
            return tuple(v for v in (x, hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states)


class ScaleHyperForMaskedLM(ScaleHyperPreTrainedModel):
    def __init__(self, config: ScaleHyperConfig) -> None:
        super().__init__(config)
        self.model = ScaleHyperModel(config)
        self.lm_head = MaskedLMHead(config.to_model_config())
        self.post_init()

    def get_output_embeddings(self) -> None:
        # The decoder IS the input embedding (one parameter), so there is nothing separate to tie.
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sparse_logits: bool = False,
        mlm_positions: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """labels [B, N]: -100 = not predicted; logits [B, N, V] (the Hugging Face contract).

        The vocabulary matmul dominates the head, so training runs it only where there is something
        to predict. ``mlm_positions`` [K] (flat indices into B × N) with ``mlm_labels`` [K] (-100 for
        padding), as scale-hyper's loader makes them: logits [K, V] in that order, and no operation
        whose output shape depends on the data — no device→host sync (``labels`` is then unused).
        ``sparse_logits=True`` with only ``labels`` does the same for callers without positions, at the
        cost of one sync (``nonzero``): logits [M, V] in ``labels[labels != -100]`` order."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        sequence = out.last_hidden_state
        word_embeddings = self.model.embeddings.word_embeddings
        loss = None
        if mlm_positions is None and sparse_logits:
            if labels is None:
                raise ValueError("sparse_logits=True needs labels (it selects the positions with labels != -100)")
            flat = labels.flatten()
            mlm_positions = (flat != -100).nonzero().squeeze(1)  # the host waits for the device here
            mlm_labels = flat.index_select(0, mlm_positions)
        if mlm_positions is not None:
            logits = self.lm_head(sequence.flatten(0, 1).index_select(0, mlm_positions), word_embeddings)
            if mlm_labels is not None:
                loss = F.cross_entropy(logits.float(), mlm_labels, ignore_index=-100)
            elif labels is not None:
                raise ValueError("mlm_positions needs mlm_labels (the labels at those positions, -100 for padding)")
        else:
            logits = self.lm_head(sequence, word_embeddings)
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ScaleHyperForSequenceClassification(ScaleHyperPreTrainedModel):
    """Pooler on [CLS] + classifier. num_labels == 1 is regression (HF ``problem_type`` rules)."""

    def __init__(self, config: ScaleHyperConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ScaleHyperModel(config)
        self.classification_head = ClassificationHead(config.to_model_config(), config.num_labels)
        self.post_init()

    def _problem_type(self, labels: torch.Tensor) -> str:
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classification_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            problem = self._problem_type(labels)
            if problem == "regression":
                if self.num_labels == 1:
                    loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
                else:
                    loss = F.mse_loss(logits.float(), labels.float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


TASK_CLASSES: dict[str, type[ScaleHyperPreTrainedModel]] = {
    "base": ScaleHyperModel,
    "mlm": ScaleHyperForMaskedLM,
    "cls": ScaleHyperForSequenceClassification,
}


def build_model(mc: ModelConfig, task: str = "mlm", **hf_kwargs) -> ScaleHyperPreTrainedModel:
    """A freshly initialised model for ``task`` ("mlm" | "cls" | "base"); hf_kwargs go to the
    config (e.g. num_labels=3, problem_type="regression")."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[task](ScaleHyperConfig.from_model_config(mc.validate(), **hf_kwargs))


# save_pretrained writes these into config.json's auto_map and copies this package's files.
ScaleHyperConfig.register_for_auto_class()
ScaleHyperModel.register_for_auto_class("AutoModel")
ScaleHyperForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
ScaleHyperForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


def register_auto_classes() -> None:
    """Make the Auto classes resolve model_type "scale_hyper" to these classes (idempotent)."""
    AutoConfig.register(ScaleHyperConfig.model_type, ScaleHyperConfig, exist_ok=True)
    AutoModel.register(ScaleHyperConfig, ScaleHyperModel, exist_ok=True)
    AutoModelForMaskedLM.register(ScaleHyperConfig, ScaleHyperForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(ScaleHyperConfig, ScaleHyperForSequenceClassification, exist_ok=True)


__all__ = [
    "ScaleHyperPreTrainedModel",
    "ScaleHyperModel",
    "ScaleHyperForMaskedLM",
    "ScaleHyperForSequenceClassification",
    "build_model",
    "register_auto_classes",
]
