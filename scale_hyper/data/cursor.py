"""The training stream's resume cursor: its saved form, its checks, and re-splitting onto a new layout.

A cursor (``Cursor``) is the position after the last batch handed out; ``cursor_state`` is what
``TrainLoader.state_dict()`` saves and ``cursor_from_state`` reads it back for ``train_loader(state=...)``.
Cursors are rank-independent (ranks move in lock-step). One saved with the same world size, workers
and micro-batch size resumes exactly; one saved with another layout is re-split at shard
granularity. The rules are described in ``scale_hyper.data.loader``'s module docstring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from scale_hyper.data.plan import LoaderSpec, epoch_order, plan_slots

log = logging.getLogger("scale_hyper.data")

CURSOR_VERSION = 1


@dataclass
class Cursor:
    epoch: int = 0
    skip_shards: int = 0  # leading shards of this epoch's order already consumed (after a re-split)
    batches_in_epoch: int = 0  # batches this rank has handed out in the epoch
    batches: int = 0  # total batches this rank has handed out
    sequences: int = 0  # total sequences consumed by all ranks together


def cursor_state(spec: LoaderSpec, num_workers: int, cursor: Cursor) -> Dict[str, Any]:
    """The saved form of ``cursor`` (``TrainLoader.state_dict()``)."""
    return {
        "version": CURSOR_VERSION,
        "seed": spec.seed,
        "world_size": spec.world_size,
        "num_workers": num_workers,
        "micro_batch_size": spec.batch,
        "data": spec.fingerprint,
        **vars(cursor),
    }


def _resplit(state: Dict[str, Any], spec: LoaderSpec) -> Cursor:
    """Map a cursor saved with another (R, W, B) onto this layout at shard granularity."""
    old_w, old_r, old_b = int(state["num_workers"]) or 1, int(state["world_size"]), int(state["micro_batch_size"])
    old_slots = old_r * old_w
    epoch, skip, done = int(state["epoch"]), int(state["skip_shards"]), int(state["batches_in_epoch"])
    order = epoch_order(spec.seed, epoch, len(spec.counts))[skip:]
    segs, rounds, _ = plan_slots(order, spec.counts, old_slots)
    complete = []
    for k in range(old_slots):
        w = k % old_w
        consumed = len(range(w, done, old_w)) * old_b  # sequences slot k consumed in this epoch
        full, acc = 0, 0
        for _, lo, hi in segs[k][:rounds]:  # only whole shards count
            acc += hi - lo
            if acc > consumed:
                break
            full += 1
        complete.append(full)
    m = min(complete) if complete else 0
    new_skip = skip + m * old_slots
    seen = done * old_b * old_r
    finished = sum(spec.counts[int(s)] for s in order[: m * old_slots])
    log.warning(
        "data cursor saved with world_size=%d, num_workers=%d, micro_batch_size=%d; resuming with %d, %d, %d: "
        "epoch %d restarts after its first %d shards; %d sequences already seen this epoch are read again",
        old_r,
        old_w,
        old_b,
        spec.world_size,
        spec.workers,
        spec.batch,
        epoch,
        new_skip,
        max(0, seen - finished),
    )
    return Cursor(
        epoch=epoch,
        skip_shards=new_skip,
        batches_in_epoch=0,
        batches=int(state.get("batches", 0)),
        sequences=int(state.get("sequences", 0)),
    )


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
    if not isinstance(state, dict) or state.get("version") != CURSOR_VERSION:
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
    # 0 and 1 workers are the same layout: one logical worker per rank
    old = (int(state["world_size"]), max(1, int(state["num_workers"])), int(state["micro_batch_size"]))
    if old == (spec.world_size, spec.workers, spec.batch):
        return Cursor(
            **{k: int(state[k]) for k in ("epoch", "skip_shards", "batches_in_epoch", "batches", "sequences")}
        )
    return _resplit(state, spec)
