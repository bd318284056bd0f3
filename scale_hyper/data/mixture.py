"""Weighted mixtures of prepared datasets (``data.mixture``), mixed per sequence at load time.

Each source is a prepared ``data.output`` (local or remote, read through its manifest's shard URLs
like a single dataset). Sources must share tokenizer, vocabulary, special tokens and sequence length
(``load_sources`` names the two that differ). Each source is laid out exactly like a single dataset
(``plan``: its own seeded shard order per epoch, R × W slots, ``interleave``'s k shards at once and
shuffle buffer), read one sequence at a time.

The schedule. The weights are turned into integer shares of a period of ``PERIOD`` sequences
(largest remainder; each source at least 1) and the sources' sequences are merged in proportion
(source i's j-th sequence of a period sits at (j + ½) / share_i): a deterministic low-discrepancy
order, so every window of n sequences holds each source's share within ±1 sequence of n × weight
(±2 % over 100 batches needs 50 sequences). Every slot (rank × worker) follows the same schedule
over its own batches: slot-local batch u covers schedule positions [u·B, (u+1)·B), and source i's
slot stream is read at positions ``taken_i(u·B)`` … — a pure function of u, so any batch is
computable and resume skips straight to it. All ranks draw the same counts from each source, so
sources stay in lock-step across ranks. A source that runs out starts its next epoch (its own
shard order), logged on rank 0.

The cursor (``state_dict``): rank batches since the schedule's origin, and per source the epoch,
the schedule count at which that epoch began, and its re-split chain. Same layout and weights:
exact (the identical stream). Another world size, workers, micro batch, mixing or weights: each
source is re-split at sample granularity from what every old slot had read (``plan.slot_streams``
with per-worker counts) and the schedule starts again; a slot that had already begun a source's
next epoch (at most W − 1 batches' share) reads those few sequences again in that epoch.
Validation uses the first source's validation split.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from scale_hyper.data import shards as shardlib
from scale_hyper.data.loader import ShardReader, SlotRows, TrainLoader
from scale_hyper.data.masking import Masker, stream_key
from scale_hyper.data.plan import LoaderSpec, Planner, build_spec

log = logging.getLogger("scale_hyper.data")

PERIOD = 10_000  # weights are kept to 1/10 000
_SAME = ("seq_len", "vocab_size", "dtype", "special_tokens")


def load_sources(data_cfg) -> List[Dict[str, Any]]:
    """The sources' manifests (each with its location), checked to be mixable with each other and the run."""
    manifests = []
    for i, src in enumerate(data_cfg.mixture):
        m = shardlib.load_manifest(src.output, bool(data_cfg.allow_pipe))
        if m is None:
            raise ValueError(
                f"data.mixture[{i}].output={src.output} holds no prepared data (no manifest.json) — prepare it "
                f"first: `scale-hyper prepare data.source=... data.output={src.output}` with the mixture's tokenizer"
            )
        manifests.append(m)
    first, name0 = manifests[0], f"data.mixture[0].output={data_cfg.mixture[0].output}"
    for i, m in enumerate(manifests[1:], 1):
        name = f"data.mixture[{i}].output={data_cfg.mixture[i].output}"
        diff = [k for k in _SAME if m.get(k) != first.get(k)]
        if m.get("tokenizer", {}).get("sha256") != first.get("tokenizer", {}).get("sha256"):
            diff.insert(0, "tokenizer")
        if diff:
            raise ValueError(
                f"{name0} and {name} differ in {', '.join(diff)}: a mixture needs one tokenizer and seq_len — "
                "prepare every source with data.tokenizer set to one tokenizer directory (e.g. a local copy of "
                f"{first['location']}/{first.get('tokenizer', {}).get('path', 'tokenizer')}) and the same data.seq_len"
            )
    if int(first["seq_len"]) != int(data_cfg.seq_len):
        raise ValueError(
            f"the mixture's sources hold sequences of {first['seq_len']} tokens, data.seq_len={data_cfg.seq_len} — "
            f"set data.seq_len={first['seq_len']}"
        )
    return manifests


class Schedule:
    """Which source each position of a slot's sequence stream comes from (see the module docstring)."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        shares = np.maximum(1, np.floor(w * PERIOD).astype(np.int64))
        for i in np.argsort(-(w * PERIOD - np.floor(w * PERIOD)), kind="stable")[: PERIOD - int(shares.sum())]:
            shares[i] += 1  # largest remainders
        self.shares = shares
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in shares])
        self.order = np.repeat(np.arange(len(shares)), shares)[np.argsort(keys, kind="stable")]
        self.period = len(self.order)
        onehot = self.order[None, :] == np.arange(len(shares))[:, None]
        self.cum = np.concatenate([np.zeros((len(shares), 1), np.int64), np.cumsum(onehot, axis=1)], axis=1)

    def taken(self, t: int) -> np.ndarray:
        """Sequences of each source among positions [0, t)."""
        return (t // self.period) * self.shares + self.cum[:, t % self.period]

    def sources(self, lo: int, hi: int) -> np.ndarray:
        return self.order[np.arange(lo, hi) % self.period]


@dataclasses.dataclass
class SourcePos:
    epoch: int = 0
    start: int = 0  # schedule count (per slot, since the origin) at which this epoch's current layout began
    resplits: List[List[int]] = dataclasses.field(default_factory=list)


class _Sources:
    """One source's spec, planner and reader; walks a slot's schedule count forward through its epochs."""

    def __init__(self, spec: LoaderSpec, pos: SourcePos, index: int):
        self.spec, self.pos, self.index = spec, dataclasses.replace(pos, resplits=list(pos.resplits)), index
        self.planner, self.reader = Planner(spec), SlotRows(ShardReader(spec, cache_size=2 * spec.lanes + 1))

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few objects per worker, alive as long as it)
    def _shift(self, epoch: int) -> np.uint64:
        return np.uint64(stream_key(self.spec.seed, epoch, salt=self.index + 1))

    def length(self) -> int:
        return self.planner.plan(self.pos.epoch, 0, self.pos.resplits).batches_per_slot  # batch 1: sequences

    def advance_to(self, count: int) -> bool:
        """Move to the epoch that holds schedule count ``count``; True when an epoch ended."""
        ended = False
        while count - self.pos.start >= self.length():
            p = self.pos
            self.pos = SourcePos(p.epoch + 1, p.start + self.length(), [])
            ended = True
        return ended

    def rows(self, slot: int, a: int, b: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Rows of schedule counts [a, b) of ``slot`` (across an epoch end if need be), with mask ids: the
        global sequence id moved by a hash of (source, epoch), so masks differ across sources and epochs."""
        parts = []
        while a < b:
            self.advance_to(a)
            p = self.pos
            take = min(b, p.start + self.length()) - a
            plan = self.planner.plan(p.epoch, 0, p.resplits)
            ids, uids = self.reader.get(plan, p.epoch, slot, a - p.start, a - p.start + take)
            shift = self._shift(p.epoch)
            parts.append((ids, uids.astype(np.uint64) + shift))
            a += take
        return parts


class _MixStream(torch.utils.data.IterableDataset):
    def __init__(self, specs: List[LoaderSpec], schedule: Schedule, batch: int, origin: int, pos: List[SourcePos]):
        super().__init__()
        self.specs, self.schedule, self.batch, self.origin, self.pos = specs, schedule, batch, origin, pos

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        from scale_hyper.data.loader import to_batch

        info = torch.utils.data.get_worker_info()
        phys, nphys = (info.id, info.num_workers) if info is not None else (0, 1)
        sp = self.specs[0]
        srcs = [_Sources(s, p, i) for i, (s, p) in enumerate(zip(self.specs, self.pos, strict=True))]
        masker = Masker(sp.vocab_size, sp.special.values(), sp.special["mask"], sp.mask_prob)
        x, B, key = self.origin + phys, self.batch, stream_key(sp.seed, 0, salt=0x5A17)
        while True:
            w, u = x % sp.workers, x // sp.workers
            slot, which = sp.rank * sp.workers + w, self.schedule.sources(u * B, (u + 1) * B)
            start = self.schedule.taken(u * B)
            ids, uids = np.empty((B, sp.seq_len), dtype=sp.dtype), np.empty(B, np.uint64)
            for i in np.unique(which).tolist():
                sel, at = np.flatnonzero(which == i), 0
                for rows, mask_ids in srcs[i].rows(slot, int(start[i]), int(start[i]) + len(sel)):
                    ids[sel[at : at + len(rows)]], uids[sel[at : at + len(rows)]] = rows, mask_ids
                    at += len(rows)
            yield to_batch(masker(ids, uids, key), ids, sp.special["pad"])
            x += nphys


class MixtureLoader(TrainLoader):
    """Infinite training batches of one rank drawn from several sources; ``state_dict()`` is the cursor."""

    def __init__(self, specs, schedule, batch, names, cursor, num_workers, multiprocessing_context=None):
        self.specs, self.schedule, self.micro, self.names = specs, schedule, batch, names
        self.origin, self.batches, self.sequences = cursor["origin"], cursor["batches"], cursor["sequences"]
        self.sources = [_Sources(s, p, i) for i, (s, p) in enumerate(zip(specs, cursor["pos"], strict=True))]
        super().__init__(specs[0], None, num_workers, multiprocessing_context)  # type: ignore[arg-type]

    def _normalize(self) -> None:
        self._catch_up(log_epochs=False)

    @property
    def batches_per_epoch(self) -> int:  # a mixture has no epoch of its own: the first source's, in batches
        return self.sources[0].length() // self.micro * self.spec.workers

    @property
    def epoch(self) -> int:
        return self.sources[0].pos.epoch

    def _catch_up(self, log_epochs: bool = True) -> None:
        """Move each source's anchor to the epoch every slot of this rank has reached."""
        done = self.schedule.taken(self.origin // self.spec.workers * self.micro)
        for i, src in enumerate(self.sources):
            if src.advance_to(int(done[i])) and log_epochs and self.spec.rank == 0:
                log.warning("data.mixture[%d] (%s) ran out: starting its epoch %d", i, self.names[i], src.pos.epoch)

    def _advance(self) -> None:
        self.origin += 1
        self.batches += 1
        self.sequences += self.micro * self.spec.world_size
        self._catch_up()

    def _stream(self) -> torch.utils.data.IterableDataset:
        pos = [dataclasses.replace(s.pos, resplits=list(s.pos.resplits)) for s in self.sources]
        return _MixStream(self.specs, self.schedule, self.micro, self.origin, pos)

    def state_dict(self) -> Dict[str, Any]:
        sp = self.spec
        return {
            "version": 2, "mixture": [s.fingerprint for s in self.specs], "seed": sp.seed,
            "world_size": sp.world_size, "num_workers": self.num_workers, "micro_batch_size": self.micro,
            "shards_per_worker": sp.lanes, "shuffle_buffer": sp.buffer, "shares": self.schedule.shares.tolist(),
            "batches": self.batches, "sequences": self.sequences, "origin": self.origin,
            "sources": [[s.pos.epoch, s.pos.start, [list(r) for r in s.pos.resplits]] for s in self.sources],
        }  # fmt: skip


def _resume(state: Dict[str, Any], specs: List[LoaderSpec], schedule: Schedule, batch: int) -> Dict[str, Any]:
    sp = specs[0]
    if not isinstance(state, dict) or state.get("mixture") != [s.fingerprint for s in specs]:
        raise ValueError(
            "the data cursor belongs to other data (not this data.mixture, or its sources changed since the "
            "checkpoint) — point data.mixture at the sources the run started with, or start a new run"
        )
    if int(state["seed"]) != sp.seed:
        raise ValueError(f"the data cursor was saved with train.seed={state['seed']}, this run has {sp.seed}")
    pos = [SourcePos(int(e), int(s), [list(map(int, r)) for r in rs]) for e, s, rs in state["sources"]]
    cur: Dict[str, Any] = {
        "origin": int(state["origin"]),
        "batches": int(state["batches"]),
        "sequences": int(state["sequences"]),
        "pos": pos,
    }
    old = (int(state["world_size"]), max(1, int(state["num_workers"])), int(state["micro_batch_size"]),
           int(state["shards_per_worker"]), int(state["shuffle_buffer"]))  # fmt: skip
    if old == (sp.world_size, sp.workers, batch, *sp.mixing) and state["shares"] == schedule.shares.tolist():
        return cur
    # another layout or weights: re-split every source from what each old slot had read, restart the schedule
    before = Schedule([float(x) for x in state["shares"]])
    R, W, B, k, buf = old
    for i, p in enumerate(pos):
        length = Planner(dataclasses.replace(specs[i], world_size=R, workers=W, rank=0, lanes=k, buffer=buf))
        full = length.plan(p.epoch, 0, p.resplits).batches_per_slot
        read = [
            min(full, max(0, int(before.taken(len(range(w, cur["origin"], W)) * B)[i]) - p.start)) for w in range(W)
        ]
        pos[i] = SourcePos(p.epoch, 0, [*p.resplits, [R, W, 1, 0, k, buf, *read]])
    log.warning(
        "data cursor saved with world_size=%d, num_workers=%d, micro_batch_size=%d, shards_per_worker=%d, "
        "shuffle_buffer=%d and mixture shares %s; re-split onto this run's layout, the schedule starts again",
        *old, state["shares"],
    )  # fmt: skip
    cur["origin"] = 0
    return cur


def mixture_loader(
    data_cfg, seed: int, rank: int, world_size: int, micro_batch_size: int,
    state: Optional[Dict[str, Any]] = None, multiprocessing_context=None,
) -> MixtureLoader:  # fmt: skip
    """The training batches of one rank from ``data.mixture`` (see the module docstring)."""
    workers = int(data_cfg.num_workers)
    specs = []
    for i, m in enumerate(load_sources(data_cfg)):
        spec = build_spec(data_cfg, m, "train", seed, rank, world_size, workers, 1)
        if len(spec.counts) < spec.slots:
            raise ValueError(
                f"data.mixture[{i}].output={data_cfg.mixture[i].output} has {len(spec.counts)} training shard(s), "
                f"fewer than world_size={world_size} × data.num_workers={max(1, workers)} = {spec.slots} readers — "
                "lower data.num_workers, or re-prepare it with a larger data.min_shards"
            )
        specs.append(spec)
    schedule = Schedule([s.weight for s in data_cfg.mixture])
    cursor = {"origin": 0, "batches": 0, "sequences": 0, "pos": [SourcePos() for _ in specs]}
    if state is not None:
        cursor = _resume(state, specs, schedule, micro_batch_size)
    names = [s.output for s in data_cfg.mixture]
    return MixtureLoader(specs, schedule, micro_batch_size, names, cursor, workers, multiprocessing_context)
