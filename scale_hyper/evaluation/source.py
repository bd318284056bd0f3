"""Where a model comes from: a scale-hyper checkpoint, a run directory, or a Hugging Face directory.

``resolve(path)`` tells them apart; ``run_config(source, args)`` gives the RunConfig to use (the
checkpoint's own config with the caller's CONFIG/key=value on top, or the defaults + the caller's
arguments for a Hugging Face directory); the ``load_*`` functions build the model on the CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from scale_hyper.config import RunConfig, load_config, to_yaml
from scale_hyper.engine import checkpoint


@dataclass
class ModelSource:
    path: Path
    kind: str  # "checkpoint" | "hf"
    run: Optional[RunConfig] = None  # the training config (checkpoints only)
    mlflow_run_id: Optional[str] = None  # the training run, when known

    @property
    def name(self) -> str:
        if self.kind == "checkpoint":
            return f"{self.path.parent.parent.name}/{self.path.name}"
        return f"{self.path.parent.name}/{self.path.name}" if self.run is not None else self.path.name


def resolve(path: str | os.PathLike) -> ModelSource:
    p = Path(path)
    if (p / checkpoint.MARKER).is_file():
        return _checkpoint_source(p)
    if (p / "config.json").is_file():
        near = _checkpoint_near_export(p)
        if near is None:
            return ModelSource(p, "hf")
        # `train`'s own export ({output_dir}/hf): its run's config (data, batch size, tracking) is the base.
        from scale_hyper.engine.export import run_config_of

        return ModelSource(
            p, "hf", run=run_config_of(near), mlflow_run_id=checkpoint.read_state(near).get("mlflow_run_id")
        )
    found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(str(p)))
    if found:
        return _checkpoint_source(found[-1])
    raise FileNotFoundError(
        f"{p} is neither a scale-hyper checkpoint (no {checkpoint.MARKER}), a run output_dir with finished "
        "checkpoints, nor a Hugging Face directory (no config.json)"
    )


def _checkpoint_source(ckpt: Path) -> ModelSource:
    from scale_hyper.engine.export import run_config_of

    state = checkpoint.read_state(ckpt)
    return ModelSource(ckpt, "checkpoint", run=run_config_of(ckpt), mlflow_run_id=state.get("mlflow_run_id"))


def _checkpoint_near_export(hf_dir: Path) -> Optional[Path]:
    """`train` exports to {output_dir}/hf: the newest checkpoint beside it (None if there is none)."""
    found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(str(hf_dir.parent)))
    return found[-1] if found else None


def run_config(source: ModelSource, args: Sequence[str]) -> RunConfig:
    """The checkpoint's training config (data, model, tracking) with ``args`` merged on top."""
    if source.run is None:
        return load_config(list(args))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(to_yaml(source.run))
    try:
        return load_config([f.name, *args])
    finally:
        os.unlink(f.name)


def checkpoint_state_dict(source: ModelSource) -> Dict[str, torch.Tensor]:
    from scale_hyper.engine.export import consolidated_state_dict

    return consolidated_state_dict(source.path)


def load_mlm(source: ModelSource) -> torch.nn.Module:
    """A masked-LM model in eval mode (ours for checkpoints / our exports, any HF MLM otherwise)."""
    if source.kind == "checkpoint":
        from scale_hyper.models import build_model

        model = build_model(source.run.model, task="mlm")
        load_strict(model, checkpoint_state_dict(source), source.path)
        return model.eval()
    from transformers import AutoModelForMaskedLM

    import scale_hyper.models  # noqa: F401  (registers model_type scale_hyper with the Auto classes)

    return AutoModelForMaskedLM.from_pretrained(source.path).eval()


def load_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_tokenizer_for(source: ModelSource, run: Optional[RunConfig] = None):
    if source.kind == "checkpoint":
        from scale_hyper.data import load_tokenizer

        try:
            return load_tokenizer((run or source.run).data)
        except (OSError, ValueError):
            export = source.path.parent.parent / "hf"  # the run's own export carries the same tokenizer
            if not (export / "tokenizer.json").is_file():
                raise
    else:
        export = source.path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export)


def hf_config_dict(source: ModelSource) -> dict:
    return json.loads((source.path / "config.json").read_text())
