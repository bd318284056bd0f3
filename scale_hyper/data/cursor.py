"""The training stream's resume cursor: its saved form, its checks, and re-splitting onto a new layout.

A cursor (``Cursor``) is the position after the last batch handed out; ``cursor_state`` is what
``TrainLoader.state_dict()`` saves and ``cursor_from_state`` reads it back for ``train_loader(state=...)``.
Cursors are rank-independent (ranks move in lock-step). One saved with the same world size, workers
and micro-batch size resumes exactly (the same batches as without the interruption). One saved with
another layout is re-split at sample granularity: the cursor records the layout the epoch was read
with so far (``resplits``), and ``plan.slot_streams`` deals exactly the sequences that layout had not
read to the new one — none is read twice, none skipped beyond the usual end-of-epoch remainder. The
rules are described in ``scale_hyper.data.loader``'s module docstring.

What a position is: (epoch, the epoch's shard order after ``skip_shards``, the chain of layouts it
was read with, batches this rank took in the current layout). Everything else is a pure function of
the seed and the manifest. ``data.shards_per_worker`` and ``data.shuffle_buffer`` belong to the layout
(they decide which sequences a slot has read); changing them re-splits like a new world size. A
weighted mixture keeps one such position per source plus its schedule position (``mixture``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from scale_hyper.data.plan import LoaderSpec, Planner

log = logging.getLogger("scale_hyper.data")

CURSOR_VERSION = 2  # 2 added ``resplits``; version-1 cursors (no re-split in progress) still load


@dataclass
class Cursor:
    epoch: int = 0
    skip_shards: int = 0  # leading shards of this epoch's order already consumed (version-1 re-splits)
    batches_in_epoch: int = 0  # batches this rank has handed out in the epoch, in the current layout
    batches: int = 0  # total batches this rank has handed out
    sequences: int = 0  # total sequences consumed by all ranks together
    # earlier layouts of this epoch, oldest first: [world_size, workers, micro batch, batches per rank]
    resplits: List[List[int]] = field(default_factory=list)


def cursor_state(spec: LoaderSpec, num_workers: int, cursor: Cursor) -> Dict[str, Any]:
    """The saved form of ``cursor`` (``TrainLoader.state_dict()``)."""
    state = {
        "version": CURSOR_VERSION,
        "seed": spec.seed,
        "world_size": spec.world_size,
        "num_workers": num_workers,
        "micro_batch_size": spec.batch,
        "shards_per_worker": spec.lanes,
        "shuffle_buffer": spec.buffer,
        "data": spec.fingerprint,
        **vars(cursor),
    }
    state["resplits"] = [list(r) for r in cursor.resplits]
    return state


def _resplit(state: Dict[str, Any], spec: LoaderSpec, cursor: Cursor) -> Cursor:
    """Continue a cursor saved with another (R, W, B) on this layout, at sample granularity."""
    old = [int(state["world_size"]), max(1, int(state["num_workers"])), int(state["micro_batch_size"])]
    done = cursor.batches_in_epoch
    chain = [*cursor.resplits, [*old, done, *saved_mixing(state)]] if done or cursor.resplits else []
    new = Cursor(cursor.epoch, cursor.skip_shards, 0, cursor.batches, cursor.sequences, chain)
    planner = Planner(spec)
    left = planner.rank_batches(new.epoch, new.skip_shards, new.resplits)
    log.warning(
        "data cursor saved with world_size=%d, num_workers=%d, micro_batch_size=%d; resuming with %d, %d, %d: "
        "epoch %d continues with the %d batches per rank its unread sequences make (none read twice)",
        *old, spec.world_size, spec.workers, spec.batch, new.epoch, left,
    )  # fmt: skip
    if tuple(saved_mixing(state)) != spec.mixing:
        log.warning(
            "data cursor saved with data.shards_per_worker=%d, data.shuffle_buffer=%d; this run has %d, %d",
            *saved_mixing(state), *spec.mixing,
        )  # fmt: skip
    return new


def saved_mixing(state: Dict[str, Any]) -> List[int]:
    """(shards_per_worker, shuffle_buffer) a cursor was read with; cursors from before they existed: (1, 0)."""
    return [int(state.get("shards_per_worker", 1)), int(state.get("shuffle_buffer", 0))]


def resplit_cursor(cursors: Sequence[Optional[Dict[str, Any]]], rank: int, world_size: int) -> Dict[str, Any]:
    """The cursor to resume ``rank`` of ``world_size`` from the cursors all ranks saved.

    Cursors are rank-independent (ranks move in lock-step), so any saved one serves every rank; a
    different world size is re-split by ``train_loader(state=...)`` itself (``loader``'s module docstring).
    """
    saved = [c for c in cursors if c]
    if not saved:
        raise ValueError("no data cursor was saved in the checkpoint")
    first = saved[0]
    if any(c != first for c in saved[1:]):
        raise ValueError("the saved data cursors disagree across ranks; the checkpoint's ranks were not in lock-step")
    return dict(first)


def cursor_from_state(state: Dict[str, Any], spec: LoaderSpec) -> Cursor:
    if not isinstance(state, dict) or state.get("version") not in (1, CURSOR_VERSION):
        raise ValueError(f"not a data-loader cursor (version {CURSOR_VERSION}): {state!r:.120}")
    if int(state["seed"]) != spec.seed:
        raise ValueError(
            f"the data cursor was saved with train.seed={state['seed']}, this run has {spec.seed}; "
            "resume with the same seed, or start the data stream afresh (state=None)"
        )
    if state.get("data") != spec.fingerprint:
        raise ValueError(
            "the data cursor belongs to different shards (the manifest changed since the checkpoint); "
            "point data.output at the data the run started with, or start the data stream afresh (state=None)"
        )
    cursor = Cursor(
        **{k: int(state[k]) for k in ("epoch", "skip_shards", "batches_in_epoch", "batches", "sequences")},
        resplits=[[int(x) for x in r] for r in state.get("resplits", [])],
    )
    # 0 and 1 workers are the same layout: one logical worker per rank
    old = (int(state["world_size"]), max(1, int(state["num_workers"])), int(state["micro_batch_size"]))
    if old == (spec.world_size, spec.workers, spec.batch) and tuple(saved_mixing(state)) == spec.mixing:
        return cursor
    return _resplit(state, spec, cursor)
