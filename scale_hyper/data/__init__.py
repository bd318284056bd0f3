"""Data at run time: prepared WebDataset shards streamed as MLM batches, and what reads them.

Shards, manifest and tokenizer are read here (``shards``, ``tokenizer``, ``storage``/``s3`` for remote
outputs); they are made by ``scale_hyper.prepare``, the layer above, which imports this package and
never the reverse. The public API (what the trainer uses)::

    manifest = scale_hyper.prepare.ensure_prepared(cfg.data, seed=cfg.train.seed)  # rank 0 prepares
    check_vocab(manifest, cfg.model.vocab_size)
    loader = train_loader(cfg.data, manifest, seed=..., rank=r, world_size=w, micro_batch_size=b, state=None)
    vl = val_loader(cfg.data, manifest, rank=r, world_size=w, micro_batch_size=b, max_batches=n)
    tok = load_tokenizer(manifest)
    state = resplit_cursor(saved_cursors, rank=r, world_size=w)  # cursors are rank-independent

Imports are lazy so that prepare's tokenizer worker processes (which import
``scale_hyper.data.tokenizer``) do not pay for torch and webdataset.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

_EXPORTS = {
    "train_loader": "scale_hyper.data.loader",
    "val_loader": "scale_hyper.data.validation",
    "resplit_cursor": "scale_hyper.data.cursor",
    "TrainLoader": "scale_hyper.data.loader",
    "ValLoader": "scale_hyper.data.validation",
    "load_tokenizer": "scale_hyper.data.tokenizer",
    "load_manifest": "scale_hyper.data.shards",
    "CorruptShardError": "scale_hyper.data.shards",
}

__all__ = sorted([*_EXPORTS, "check_vocab"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'scale_hyper.data' has no attribute {name!r}")


def check_vocab(manifest: Dict[str, Any], model_vocab_size: int) -> None:
    """Fail before training when the model's embedding cannot hold every token id of the data.

    A model vocabulary larger than the tokenizer's is accepted (the extra rows are never used:
    ``model.vocab_size`` follows ``data.vocab_size``, a target the trained vocabulary may fall short of).
    """
    vocab = int(manifest["vocab_size"])
    where = manifest.get("location", "the prepared data")
    if int(model_vocab_size) < vocab:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary ({vocab} tokens, "
            f"{where}); token ids up to {vocab - 1} would index past the embedding. Set model.vocab_size={vocab} "
            f"(or leave it following data.vocab_size), or prepare data with data.vocab_size<={model_vocab_size} "
            "into another data.output"
        )
