"""`scale-hyper prepare`: raw corpora → WordPiece tokenizer → tokenized, packed WebDataset shards + manifest.

``main`` is the verb (plan → slices → merge, over tasks and worker processes; ``ensure_prepared`` is
what ``train`` calls); ``sources`` and ``formats`` read the corpus, ``wordpiece`` trains the tokenizer
and encodes documents, ``slices`` makes the plan and turns one slice into shards (``shard_writer``) and
a partial manifest, ``merge`` writes ``manifest.json``, ``space`` turns a full disk into one line.
Progress: one log line per finished slice (rank/task-local, with the tokens per second).
What the shards, manifest and tokenizer look like to their readers is ``scale_hyper.data`` (the
layer below: this package imports it, never the reverse).

Imports are lazy: ``import scale_hyper.prepare`` loads none of its modules (nor torch or webdataset).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ensure_prepared": "scale_hyper.prepare.main",
    "prepare": "scale_hyper.prepare.main",
    "PrepareError": "scale_hyper.prepare.slices",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'scale_hyper.prepare' has no attribute {name!r}")
