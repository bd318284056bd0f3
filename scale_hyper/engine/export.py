"""`scale-hyper export CKPT OUT`: a training checkpoint → a Hugging Face directory.

The directory holds safetensors weights, the config with `auto_map`, the model's own code (so
`AutoModelForMaskedLM.from_pretrained(OUT, trust_remote_code=True)` works without scale-hyper
installed) and the tokenizer the shards were made with.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Sequence

import torch
from omegaconf import OmegaConf

from scale_hyper.config import RunConfig
from scale_hyper.engine import checkpoint


def run_config_of(ckpt: Path) -> RunConfig:
    """The resolved config a checkpoint was trained with (stored in its trainer state)."""
    text = checkpoint.read_state(ckpt)["config_yaml"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text)))


def consolidated_state_dict(ckpt: Path) -> Dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage (DeepSpeed's zero_to_fp32 for stages 1–3)."""
    if list(ckpt.glob("zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # ZeRO-0: the whole module is in the model-states file.
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    from scale_hyper.data import load_tokenizer
    from scale_hyper.models import build_model

    ckpt = Path(ckpt)
    run = run_config_of(ckpt)
    model = build_model(run.model, task="mlm")
    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(run.data).save_pretrained(out)
    return out


def main(ckpt_arg: str, out: str, configs: Sequence[str] = ()) -> int:
    ckpt = Path(ckpt_arg)
    if not (ckpt / checkpoint.MARKER).is_file():  # a run directory: take its newest checkpoint
        found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(str(ckpt)))
        if not found:
            print(f"scale-hyper: no finished checkpoint in {ckpt}", file=sys.stderr)
            return 2
        ckpt = found[-1]
    if configs:
        print("scale-hyper: export takes the config stored in the checkpoint; extra arguments ignored", file=sys.stderr)
    path = export_checkpoint(ckpt, Path(out))
    print(f"exported {ckpt} -> {path}")
    return 0
