"""`scale-hyper export CKPT OUT`: a training checkpoint → a Hugging Face directory.

The directory holds safetensors weights, the config with `auto_map`, the model's own code (so
`AutoModelForMaskedLM.from_pretrained(OUT, trust_remote_code=True)` works without scale-hyper
installed) and the tokenizer the shards were made with.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from scale_hyper import runs
from scale_hyper.runs import manifest


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    from scale_hyper.data import load_tokenizer
    from scale_hyper.models import build_model

    run = runs.run_config_of(ckpt)
    model = build_model(run.model, task="mlm")
    runs.load_strict(model, runs.consolidated_state_dict(ckpt), ckpt)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(run.data).save_pretrained(out)
    return out


def main(source: str, out: str, configs: Sequence[str] = ()) -> int:
    """SOURCE: a checkpoint, DeepSpeed's save directory (RUN/checkpoints) or a run directory; verified
    against its manifest first (``train.verify_checkpoint=`` among ``configs``; a run directory gives its
    newest checkpoint that verifies)."""
    try:
        ckpt = manifest.find_intact(source, manifest.mode_from_args(configs))
    except (runs.NoCheckpointError, manifest.DamagedCheckpointError) as err:
        print(f"scale-hyper: error: {err}", file=sys.stderr)
        return 2
    ignored = [c for c in configs if not c.startswith("train.verify_checkpoint=")]
    if ignored:
        print("scale-hyper: export takes the config stored in the checkpoint; extra arguments ignored "
              "(train.verify_checkpoint excepted)", file=sys.stderr)  # fmt: skip
    path = export_checkpoint(ckpt, Path(out))
    print(f"exported {ckpt} -> {path}")
    return 0
