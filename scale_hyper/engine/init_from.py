"""``train.init_from=SRC``: start a run from trained weights instead of a random initialisation.

SRC is anything ``scale-hyper eval`` accepts: a Hugging Face directory written by ``train`` or
``transplant``, a run output_dir, or one checkpoint. Used to continue MLM after a transplant, or to
start a longer run from a shorter one with a fresh optimizer and schedule (to continue the SAME
run, resume instead).

The weights decide the architecture: the source's geometry replaces ``model.*`` (a transplant's
8 layers and its shared mixers arrive without the user restating them), except for settings that
do not change what the weights mean (dropout, kernels, chunking). The data's tokenizer must be the
one the weights were trained with. Only a new run is initialised: once the run has a checkpoint
of its own, resuming wins and ``init_from`` only fixes the geometry.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from scale_hyper.config import RunConfig
from scale_hyper.models.model_config import ModelConfig

# ModelConfig fields a user may change when starting from trained weights.
FREE_FIELDS = ("dropout", "initializer_range", "hyla_chunk", "mixer_kernel")


def _source(path: str):
    from scale_hyper.evaluation import source as sources  # lazy: evaluation imports the engine

    try:
        return sources.resolve(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.init_from={path!r}: {err}") from None


def source_geometry(path: str) -> ModelConfig:
    """The model config of SRC (a checkpoint's training config, or an HF directory's config.json)."""
    source = _source(path)
    if source.kind == "checkpoint":
        return source.run.model
    from scale_hyper.evaluation.source import hf_config_dict
    from scale_hyper.models.configuration_scale_hyper import ScaleHyperConfig

    values = hf_config_dict(source)
    if values.get("model_type") != ScaleHyperConfig.model_type:
        raise ValueError(
            f"train.init_from={path!r} is a {values.get('model_type')!r} model, not a scale-hyper one; "
            "`scale-hyper train` continues only its own models (use `scale-hyper glue` to evaluate others)"
        )
    return ScaleHyperConfig.from_pretrained(source.path).to_model_config()


def adopt_geometry(run: RunConfig) -> List[str]:
    """Replace run.model's architecture by the source's; return the changes ("key: old -> new")."""
    if not run.train.init_from:
        return []
    theirs = source_geometry(run.train.init_from)
    changes = []
    for field in dataclasses.fields(ModelConfig):
        if field.name in FREE_FIELDS:
            continue
        old, new = getattr(run.model, field.name), getattr(theirs, field.name)
        if old != new:
            changes.append(f"model.{field.name}: {old} -> {new}")
            setattr(run.model, field.name, new)
    run.model.validate()
    return changes


def check_tokenizer(run: RunConfig, manifest: Dict) -> None:
    """The data must be tokenized with the vocabulary the weights were trained on."""
    from scale_hyper.data import load_tokenizer

    source = _source(run.train.init_from)
    try:
        if source.kind == "checkpoint":
            theirs = load_tokenizer(source.run.data).get_vocab()
        else:
            from transformers import AutoTokenizer

            theirs = AutoTokenizer.from_pretrained(source.path).get_vocab()
    except (OSError, ValueError):
        return  # the source carries no tokenizer: only the vocabulary size can be checked (check_vocab)
    ours = load_tokenizer(manifest).get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])
        example = ", ".join(f"{tok!r}={i}" for tok, i in differ[:3])
        raise ValueError(
            f"train.init_from={run.train.init_from!r} was trained with another vocabulary than "
            f"{run.data.output} ({len(theirs)} vs {len(ours)} tokens; e.g. {example}). Tokenize the data "
            f"with its tokenizer: data.tokenizer={source.path if source.kind == 'hf' else source.run.data.output} "
            "and a new data.output"
        )


def load_weights(model: torch.nn.Module, path: str) -> Optional[str]:
    """Copy SRC's weights into ``model`` (strict, so a geometry mismatch names the tensors)."""
    from scale_hyper.evaluation import source as sources

    source = _source(path)
    if source.kind == "checkpoint":
        state = sources.checkpoint_state_dict(source)
    else:
        state = sources.load_mlm(source).state_dict()
    sources.load_strict(model, state, source.path)
    return str(source.path)
