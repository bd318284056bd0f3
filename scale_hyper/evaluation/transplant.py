"""`scale-hyper transplant SRC --layers N [--embeddings cycle|interpolate|fresh] [--order cycle|stretch] --out DIR`

Reads a trained model (checkpoint, run directory or our HF export), builds the deeper one with the
model surgery of ``scale_hyper.models.transplant`` (the protocol is described there), writes it and
prints how to continue training.

Output: a Hugging Face directory (weights, config with num_layers=N and, for shared mixers,
``share_mixers``/``share_order``, tokenizer, ``transplant.json`` with the mapping and the parameter
budget). Because the sharing is part of the model config, ``scale-hyper train
train.init_from=DIR`` continues training with the mixers still shared: the budget stays fixed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from transformers import PreTrainedModel

from scale_hyper import runs as sources
from scale_hyper.models.transplant import transplant


def save(model: PreTrainedModel, info: Dict[str, Any], out: Path, tokenizer=None) -> Path:
    """HF directory; shared mixers are stored once (the config records the sharing)."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "transplant.json").write_text(json.dumps(info, indent=1))
    return out


def main(src: str, layers: int, out: Optional[str], embeddings: str, order: str, seed: int) -> int:
    try:
        source = sources.resolve(src)  # a checkpoint is verified against its manifest first
        src_model = sources.load_mlm(source)
        model, info = transplant(src_model, layers, embeddings, order, seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: error: transplant: {err}", file=sys.stderr)
        return 2
    out_dir = Path(out or f"{source.path if source.kind == 'hf' else source.path.parent.parent}-transplant-L{layers}")
    info["source"] = str(source.path)
    try:
        tokenizer = sources.load_tokenizer_for(source)
    except (OSError, ValueError) as err:  # a bare model directory: weights without a tokenizer
        print(f"scale-hyper: transplant: no tokenizer copied ({str(err).splitlines()[0]})", file=sys.stderr)
        tokenizer = None
    save(model, info, out_dir, tokenizer)
    d = info["mixing_params"] - info["mixing_params_source"]
    print(
        f"transplanted {source.path} ({info['source_layers']} layers, {info['mixer']}) -> {out_dir} ({layers} layers)"
    )
    print(f"layer map (new layer -> trained layer): {info['layer_map']}")
    if info["share_mixers"]:
        print(f"{info['share_mixers']} mixers shared across the {layers} layers ({info['share_order']}): "
              f"layer -> mixer {info['mixer_of_layer']}")  # fmt: skip
    print(f"mixing parameters: {info['mixing_params_source']:,} -> {info['mixing_params']:,} ({d:+,}); "
          f"total {info['total_params_source']:,} -> {info['total_params']:,}")  # fmt: skip
    data = f" data.output={source.run.data.output}" if source.run is not None else ""
    print("continue MLM training (geometry and sharing come from the directory):")
    print(f"    scale-hyper train{data} train.init_from={out_dir} train.output_dir={out_dir}-run")
    return 0
