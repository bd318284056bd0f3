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

from scale_hyper import runs
from scale_hyper.config import RunConfig
from scale_hyper.config.model import ModelConfig

# ModelConfig fields a user may change when starting from trained weights.
FREE_FIELDS = ("dropout", "initializer_range", "hyla_chunk", "mixer_kernel")


def _source(path: str, verify: str) -> runs.ModelSource:
    """SRC, a checkpoint verified against its manifest (``train.verify_checkpoint``; once per process)."""
    try:
        return runs.resolve(path, verify)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.init_from={path!r}: {err}") from None


def adopt_geometry(run: RunConfig) -> List[str]:
    """Replace run.model's architecture by the source's; return the changes ("key: old -> new")."""
    if not run.train.init_from:
        return []
    try:
        theirs = runs.source_geometry(_source(run.train.init_from, run.train.verify_checkpoint))
    except ValueError as err:
        raise ValueError(f"train.init_from={run.train.init_from!r}: {err}") from None
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

    assert run.train.init_from is not None
    source = _source(run.train.init_from, run.train.verify_checkpoint)
    try:
        theirs = runs.load_tokenizer_for(source).get_vocab()
    except (OSError, ValueError):
        return  # the source carries no tokenizer: only the vocabulary size can be checked (check_vocab)
    ours = load_tokenizer(manifest).get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])
        example = ", ".join(f"{tok!r}={i}" for tok, i in differ[:3])
        where = source.path if source.kind == "hf" or source.run is None else source.run.data.output
        raise ValueError(
            f"train.init_from={run.train.init_from!r} was trained with another vocabulary than "
            f"{run.data.output} ({len(theirs)} vs {len(ours)} tokens; e.g. {example}) — tokenize the data "
            f"with its tokenizer: data.tokenizer={where} and a new data.output"
        )


def load_weights(model: torch.nn.Module, path: str, verify: str = "full") -> Optional[str]:
    """Copy SRC's weights into ``model`` (strict, so a geometry mismatch names the tensors)."""
    source = _source(path, verify)
    if source.kind == "checkpoint":
        state = runs.consolidated_state_dict(source.path)
    else:
        state = runs.load_mlm(source).state_dict()
    runs.load_strict(model, state, source.path)
    return str(source.path)
