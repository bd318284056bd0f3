"""Epoch and shard planning for the streaming loaders: the loader spec and how an epoch is laid out.

``LoaderSpec`` holds everything a loader worker needs (built from ``data.*``, the manifest, the seed
and the rank layout by ``build_spec``). The layout (shard order per epoch, whole shards dealt
round-robin to the R × W slots, the tail cut into equal parts, equal length per slot; or, for shards
of unequal size, the epoch's shard stream cut into R × W equal parts) is a pure function of the spec
and the epoch, so every rank computes the same plan without talking to the others. The rules are
described in ``scale_hyper.data.loader``'s module docstring.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from scale_hyper.data import shards as shardlib
from scale_hyper.data.interleave import SlotOrder

Segment = Tuple[int, int, int]  # (shard index in the manifest, first row, end row) in permuted rows


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs, picklable (spawn-safe): plain values, no open files."""

    urls: Tuple[str, ...]
    names: Tuple[str, ...]
    counts: Tuple[int, ...]
    bases: Tuple[int, ...]  # global id of each shard's first sequence
    dtype: str
    seq_len: int
    vocab_size: int
    sequences_per_block: int
    special: Dict[str, int]
    mask_prob: float
    on_corrupt: str
    allow_pipe: bool
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (num_workers, at least 1)
    batch: int
    fingerprint: str = ""
    lanes: int = 1  # data.shards_per_worker: stream parts a slot reads at once (``interleave``)
    buffer: int = 0  # data.shuffle_buffer: sequences a slot's shuffle window spans; 0 = off
    by_sequences: bool = False  # the manifest's loader_deal: cut the epoch by sequences (``plan_slots``)

    @property
    def mixing(self) -> Tuple[int, int]:
        return (self.lanes, self.buffer)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


def data_fingerprint(manifest: Dict[str, Any], split: str = "train") -> str:
    """Identifies the shard set (names, counts, hashes): a cursor only applies to the same data."""
    entries = [(s["name"], s["sequences"], s.get("sha256", "")) for s in manifest["splits"][split]["shards"]]
    h = hashlib.sha256(repr((manifest["seq_len"], manifest.get("tokenizer", {}).get("sha256"), entries)).encode())
    return h.hexdigest()[:16]


def build_spec(
    data_cfg, manifest: Dict[str, Any], split: str, seed: int, rank: int, world_size: int, workers: int, batch: int
) -> LoaderSpec:
    shards = manifest["splits"].get(split, {}).get("shards", [])
    counts = tuple(int(s["sequences"]) for s in shards)
    bases = tuple(int(b) for b in np.cumsum((0,) + counts)[:-1])
    if data_cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt={data_cfg.on_corrupt!r} must be 'skip' or 'fail'")
    return LoaderSpec(
        urls=tuple(shardlib.shard_urls(manifest, split)),
        names=tuple(s["name"] for s in shards),
        counts=counts,
        bases=bases,
        dtype=manifest["dtype"],
        seq_len=int(manifest["seq_len"]),
        vocab_size=int(manifest["vocab_size"]),
        sequences_per_block=int(manifest["sequences_per_block"]),
        special=dict(manifest["special_tokens"]),
        mask_prob=float(data_cfg.mask_prob),
        on_corrupt=data_cfg.on_corrupt,
        allow_pipe=bool(data_cfg.allow_pipe),
        seed=int(seed),
        rank=int(rank),
        world_size=int(world_size),
        workers=max(1, int(workers)),
        batch=int(batch),
        fingerprint=data_fingerprint(manifest, split) if shards else "",
        lanes=max(1, int(getattr(data_cfg, "shards_per_worker", 1))),
        buffer=max(0, int(getattr(data_cfg, "shuffle_buffer", 0))),
        by_sequences=manifest.get("loader_deal") == shardlib.DEAL_BY_SEQUENCES,
    )


def with_location(data_cfg, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest with the caller's data.output as its location (never a location from a file)."""
    if "location" in manifest:
        return manifest
    from scale_hyper.data import storage

    out = dict(manifest)
    out["location"] = storage.local_path(data_cfg.output) if storage.is_local(data_cfg.output) else data_cfg.output
    return out


def check_world(rank: int, world_size: int, micro_batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world_size:
            warnings.warn(
                f"train_loader(world_size={world_size}) but the process group has "
                f"{torch.distributed.get_world_size()} ranks; every data-parallel rank must pass its own rank "
                "and the data-parallel world size, or ranks read overlapping data",
                stacklevel=3,
            )


# --- epoch layout ------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 64) for k in key])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return _rng(seed, epoch, 0x0D0E).permutation(n)


def row_permutation(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    return _rng(seed, epoch, shard, 0x5E0).permutation(count)


def plan_slots(
    order: Sequence[int], counts: Sequence[int], slots: int, by_sequences: bool = False
) -> Tuple[List[List[Segment]], int]:
    """Deal an epoch's shards to slots (see ``loader``'s module docstring). Returns (segments per slot, usable length).

    Round-robin: whole shards, ``slots`` at a time, then the tail cut into equal parts. ``by_sequences``:
    the shards in ``order`` concatenated and cut into ``slots`` equal contiguous parts (each slot a run
    of whole shards with at most a part of one at each end), so shards of unequal size lose nothing.
    """
    order = [int(s) for s in order]
    if by_sequences:
        segs = _cut([(s, 0, counts[s]) for s in order], slots)
        return segs, min(sum(hi - lo for _, lo, hi in seg) for seg in segs) if segs else 0
    rounds = len(order) // slots
    segs: List[List[Segment]] = [[] for _ in range(slots)]
    for r in range(rounds):
        for k in range(slots):
            s = order[r * slots + k]
            segs[k].append((s, 0, counts[s]))
    tail = order[rounds * slots :]
    total = sum(counts[s] for s in tail)
    starts = np.cumsum([0] + [counts[s] for s in tail])
    for k in range(slots):
        lo, hi = k * total // slots, (k + 1) * total // slots
        for j, s in enumerate(tail):  # the parts of the concatenated tail that fall in [lo, hi)
            a, b = max(lo, int(starts[j])), min(hi, int(starts[j + 1]))
            if a < b:
                segs[k].append((s, a - int(starts[j]), b - int(starts[j])))
    length = min(sum(hi - lo for _, lo, hi in seg) for seg in segs) if segs else 0
    return segs, length


# A re-split: (world_size, workers, micro batch, batches each rank had taken, shards_per_worker,
# shuffle_buffer[, sequences each worker had read instead of batches × micro: a mixture's source]).
# Entries saved before the last two existed have 4 numbers: one shard at a time, no buffer.
Layout = Sequence[int]


def slot_order(spec: LoaderSpec, epoch: int, slot: int, stage: int, used: int, mixing: Sequence[int]) -> SlotOrder:
    lanes, buffer = (int(mixing[0]), int(mixing[1])) if len(mixing) >= 2 else (1, 0)
    return SlotOrder(used, max(1, lanes), buffer // max(1, lanes), (spec.seed, epoch, slot, stage))


def _pick(segs: Sequence[Segment], runs: Sequence[Tuple[int, int]]) -> List[Segment]:
    """The parts of the concatenation of ``segs`` at the stream indices in ``runs`` (sorted, disjoint)."""
    starts = np.cumsum([0] + [hi - lo for _, lo, hi in segs])
    out: List[Segment] = []
    for a, b in runs:
        j = max(0, int(np.searchsorted(starts, a, side="right")) - 1)
        while a < b and j < len(segs):
            s, lo, hi = segs[j]
            end = min(b, int(starts[j + 1]))
            if a < end:
                out.append((s, lo + a - int(starts[j]), lo + end - int(starts[j])))
            a, j = max(a, end), j + 1
    return out


def _cut(units: Sequence[Segment], slots: int) -> List[List[Segment]]:
    """The concatenation of ``units`` cut into ``slots`` equal contiguous parts (the last few dropped)."""
    starts = np.cumsum([0] + [hi - lo for _, lo, hi in units])
    part = int(starts[-1]) // slots
    segs: List[List[Segment]] = [[] for _ in range(slots)]
    for k in range(slots):
        a0, b0 = k * part, (k + 1) * part
        j = max(0, int(np.searchsorted(starts, a0, side="right")) - 1)  # the unit where the part starts
        while j < len(units) and starts[j] < b0:
            s, lo, _ = units[j]
            a, b = max(a0, int(starts[j])), min(b0, int(starts[j + 1]))
            if a < b:
                segs[k].append((s, lo + a - int(starts[j]), lo + b - int(starts[j])))
            j += 1
    return segs


def slot_streams(
    spec: LoaderSpec, epoch: int, skip: int, resplits: Sequence[Layout] = ()
) -> Tuple[List[List[Segment]], int]:
    """Each slot's sequence stream in this epoch (as segments) and the number of sequences every slot uses.

    Without ``resplits`` this is the normal layout (``plan_slots``). Each entry of ``resplits`` is a layout
    the epoch was read with before a resume changed it: (R, W, B, batches each rank had taken). What that
    layout's slots had not read yet — each slot's stream after the sequences it consumed — is concatenated
    slot by slot and cut into equal contiguous parts for the next layout (the last is this loader's), so a
    re-split epoch reads every sequence not yet read exactly once, at sample granularity."""
    order = epoch_order(spec.seed, epoch, len(spec.counts))[skip:]
    first = resplits[0] if resplits else (spec.world_size, spec.workers, 0, 0)
    streams, length = plan_slots(order, spec.counts, first[0] * first[1], spec.by_sequences)
    for i, (_, workers, batch, done, *rest) in enumerate(resplits):
        units: List[Segment] = []
        used = length // max(1, batch) * batch
        for k, seg in enumerate(streams):  # slot k = rank × W + worker; worker w took batches w, w + W, ...
            read = rest[2 + k % workers] if len(rest) > 2 else len(range(k % workers, done, workers)) * batch
            unread = slot_order(spec, epoch, k, i, used, rest).unread(read)
            total = sum(hi - lo for _, lo, hi in seg)
            units += _pick(seg, [*unread, (used, total)] if used < total else unread)
        nxt = resplits[i + 1] if i + 1 < len(resplits) else (spec.world_size, spec.workers, 0, 0)
        streams = _cut(units, nxt[0] * nxt[1])
        length = min(sum(hi - lo for _, lo, hi in seg) for seg in streams)
    return streams, length


@dataclass
class EpochPlan:
    segments: List[List[Segment]]
    seg_starts: List[List[int]]  # cumulative start of each segment in its slot's stream
    batches_per_slot: int
    orders: List[SlotOrder]  # each slot's read order (k shards at once, the shuffle buffer)

    def __post_init__(self) -> None:
        self.start_arrays = [np.asarray(s, dtype=np.int64) for s in self.seg_starts]


class Planner:
    """Caches epoch plans: cheap to compute, but asked for on every batch."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self._cache: OrderedDict[Tuple[int, int, Tuple[Tuple[int, ...], ...]], EpochPlan] = OrderedDict()

    def plan(self, epoch: int, skip: int, resplits: Sequence[Layout] = ()) -> EpochPlan:
        key = (epoch, skip, tuple(tuple(int(x) for x in r) for r in resplits))
        if key not in self._cache:
            segs, length = slot_streams(self.spec, epoch, skip, key[2])
            starts = [list(np.cumsum([0] + [hi - lo for _, lo, hi in seg])[:-1]) for seg in segs]
            sp, n = self.spec, length // self.spec.batch
            orders = [slot_order(sp, epoch, k, len(key[2]), n * sp.batch, sp.mixing) for k in range(len(segs))]
            self._cache[key] = EpochPlan(segs, starts, n, orders)
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[key]

    def rank_batches(self, epoch: int, skip: int, resplits: Sequence[Layout] = ()) -> int:
        return self.plan(epoch, skip, resplits).batches_per_slot * self.spec.workers
