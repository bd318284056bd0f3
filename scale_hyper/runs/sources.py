"""Where a model comes from, and how its config, weights and tokenizer are read.

A source is a checkpoint (``RUN/checkpoints/step_N``), DeepSpeed's save directory
(``RUN/checkpoints``), a run directory, or a Hugging Face directory (ours — ``RUN/hf`` or a
transplant — or any other). ``resolve`` tells them apart once; everything else takes the
``ModelSource`` it returns. torch and transformers are imported inside the functions that need
them, so resolving a path stays cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from scale_hyper.config import RunConfig, load_config, to_yaml
from scale_hyper.runs.layout import (
    MARKER,
    NoCheckpointError,
    PathLike,
    RunDir,
    is_checkpoint,
    read_state,
    run_config_of,
)
from scale_hyper.runs.manifest import find_intact

if TYPE_CHECKING:
    import torch

    from scale_hyper.config.model import ModelConfig


@dataclass
class ModelSource:
    path: Path
    kind: str  # "checkpoint" | "hf"
    run: Optional[RunConfig] = None  # the training config (checkpoints, and train's own export)
    mlflow_run_id: Optional[str] = None  # the training run, when known

    @property
    def name(self) -> str:
        if self.kind == "checkpoint":
            return f"{self.path.parent.parent.name}/{self.path.name}"
        return f"{self.path.parent.name}/{self.path.name}" if self.run is not None else self.path.name

    @property
    def config_dict(self) -> Dict[str, Any]:
        """config.json of a Hugging Face directory."""
        return json.loads((self.path / "config.json").read_text())


def _checkpoint_source(ckpt: Path, path: Optional[Path] = None, kind: str = "checkpoint") -> ModelSource:
    return ModelSource(path or ckpt, kind, run=run_config_of(ckpt), mlflow_run_id=read_state(ckpt).get("mlflow_run_id"))


def resolve(path: PathLike, verify: str = "full") -> ModelSource:
    """``verify``: how a checkpoint is checked against its manifest first (``manifest.MODES``); a damaged
    one named explicitly is refused, a run directory gives its newest checkpoint that verifies."""
    p = Path(path)
    if (p / "config.json").is_file() and not is_checkpoint(p):
        # An export inside a run directory (train's RUN/hf): its run's config (data, batch, tracking) is the base.
        near = RunDir(p.parent).newest()
        return _checkpoint_source(near, p, "hf") if near else ModelSource(p, "hf")
    try:
        return _checkpoint_source(find_intact(p, verify))
    except NoCheckpointError:
        raise NoCheckpointError(
            f"{p} is neither a scale-hyper checkpoint (no {MARKER}), a run output_dir or checkpoints/ "
            "directory with finished checkpoints, nor a Hugging Face directory (no config.json)"
        ) from None


def run_config(source: ModelSource, args: Sequence[str]) -> RunConfig:
    """The source's training config (data, model, tracking) with ``args`` merged on top."""
    if source.run is None:
        return load_config(list(args))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(to_yaml(source.run))
    try:
        return load_config([f.name, *args])
    finally:
        os.unlink(f.name)


def source_geometry(source: ModelSource) -> ModelConfig:
    """The model config of a source: the checkpoint's training config, or config.json of ours."""
    if source.kind == "checkpoint":
        assert source.run is not None
        return source.run.model
    from scale_hyper.config.model import ModelConfig

    values = source.config_dict
    if values.get("model_type") != "scale_hyper":
        raise ValueError(
            f"{source.path} is a {values.get('model_type')!r} model, not a scale-hyper one — "
            "only scale-hyper models can be continued or transplanted (use `scale-hyper glue` to evaluate others)"
        )
    return ModelConfig.from_dict(values).validate()


def consolidated_state_dict(ckpt: PathLike) -> Dict[str, torch.Tensor]:
    """Full fp32 master weights of a checkpoint in any of DeepSpeed's layouts (``runs/ds_files.py``:
    ZeRO 0-3, fp32/bf16/fp16, universal) — never the bf16/fp16 working copies."""
    from scale_hyper.models.params import weight_decay_groups
    from scale_hyper.runs import ds_files

    def groups_of(shapes):  # only ZeRO-0 bf16/fp16 needs the groups: read the config only then
        return weight_decay_groups(shapes, run_config_of(ckpt).train.decay_embeddings)

    return ds_files.fp32_state_dict(ckpt, groups_of)


def load_strict(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], where: PathLike, fresh: Sequence[str] = ()
) -> None:
    """Load every tensor, or name what does not match (``position_ids`` buffers excepted, and
    parameters under the ``fresh`` prefixes, such as a new classification head)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith(tuple(fresh))]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} — "
            "is it the same architecture (model.*) it was trained with?"
        )


def load_mlm(source: ModelSource) -> torch.nn.Module:
    """A masked-LM model in eval mode (ours for checkpoints / our exports, any HF MLM otherwise)."""
    from scale_hyper.models import build_model

    if source.kind == "checkpoint":
        assert source.run is not None
        model = build_model(source.run.model, task="mlm")
        load_strict(model, consolidated_state_dict(source.path), source.path)
        return model.eval()
    from transformers import AutoModelForMaskedLM  # scale_hyper.models registered model_type scale_hyper

    return AutoModelForMaskedLM.from_pretrained(source.path).eval()


def load_tokenizer_for(source: ModelSource, run: Optional[RunConfig] = None) -> Any:
    """The tokenizer the source was trained with (its data's, or the one saved beside it)."""
    if source.kind == "checkpoint":
        from scale_hyper.data import load_tokenizer

        try:
            return load_tokenizer((run or source.run).data)  # type: ignore[union-attr]
        except (OSError, ValueError):
            export = RunDir(source.path.parent.parent).export  # the run's own export carries the same tokenizer
            if not (export / "tokenizer.json").is_file():
                raise
    else:
        export = source.path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export)
