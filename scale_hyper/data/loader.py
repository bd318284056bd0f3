"""Streaming MLM loaders: an infinite, exactly resumable training stream and a finite validation set.

How the training stream is laid out (all of it a pure function of the manifest, ``seed``, the
epoch, ``world_size`` R, ``data.num_workers`` W and ``micro_batch_size`` B, so every rank computes
the same plan without talking to the others):

1. Shard order. Epoch ``e`` visits the train shards in the permutation drawn from ``(seed, e)``.
   The shuffle happens before any splitting, so shards move across ranks from epoch to epoch.
2. Slots. Each (rank, worker) pair is one of R × W slots (slot = rank × W + worker). Whole shards
   are dealt round-robin in that order: slot k gets shards k, k + RW, k + 2RW, …. The last
   ``n mod RW`` shards are concatenated and cut into RW equal contiguous parts, one per slot, so
   no shard is left out of an epoch.
3. Equal length. Every slot uses the same number of sequences, the smallest slot's count rounded
   down to whole batches; the few leftover sequences (shards differ by at most one sequence) are
   the only ones not seen in that epoch. Every rank therefore yields exactly the same number of
   batches per epoch: no rank runs dry first and leaves the others hanging in a collective.
4. Within a shard, sequences are visited in a permutation drawn from ``(seed, e, shard)``
   (``prepare`` already shuffled sequences across shards, so shards are random samples).
5. Masks are a function of ``(seed, e, global sequence id, position)`` (see ``masking``).
6. Batch order. A rank's batches come round-robin from its W workers (what torch's DataLoader does):
   batch ``i`` of an epoch is batch ``i // W`` of worker ``i % W``. The epoch length in batches is a
   multiple of W, so this holds across epoch boundaries too.

Rank and world size are always explicit arguments; webdataset's environment-based splitting
(which silently gives every rank all data when only SLURM variables are set) is never used.

Cursor and resume. ``TrainLoader.state_dict()`` is ``{epoch, skip_shards, batches_in_epoch, …}``
after the last batch handed out. Ranks move in lock-step, so the cursor is the same on every rank
and rank 0's copy can resume all of them. With the same R, W and B, a resumed loader yields exactly
the batches the uninterrupted one would have (worker w is restarted at its own next batch and the
DataLoader's worker order is rotated so the first batch comes from the right worker).

With a different R, W or B the old layout cannot continue, and the cursor is re-split
deterministically at shard granularity: slots consume their round-robin shards in lock-step, so
after ``m`` complete rounds the first ``m × RW_old`` shards of the epoch's order are done. The
resumed run starts the same epoch at that shard (``skip_shards``) and deals the remaining shards
to the new R × W slots. At most one partially read shard per old slot is read again (logged with
the count); nothing is skipped; later epochs are laid out normally. A cursor from a different seed
or different data is rejected.

Shuffling is exact-resume friendly by construction (global shuffle at prepare time, per-epoch shard
order, per-epoch full permutation inside each shard), so no sample buffer is kept and
``data.shuffle_buffer`` is not used. Keep one active iterator per TrainLoader: each ``iter()``
starts from the current cursor.

Corrupt shards (unreadable, truncated, wrong count) are logged and, with ``data.on_corrupt=skip``,
replaced in place by the next readable shard in manifest order (its rows repeated to the same
count), so batch counts stay equal on every rank; ``fail`` raises. Token ids outside the
vocabulary always raise, naming the shard.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from scale_hyper.data import shards as shardlib
from scale_hyper.data.masking import Masker, stream_key

log = logging.getLogger("scale_hyper.data")

CURSOR_VERSION = 1
_VAL_SEED = 0x5EED  # validation masks are fixed, independent of train.seed
Segment = Tuple[int, int, int]  # (shard index in the manifest, first row, end row) in permuted rows


@dataclass(frozen=True)
class _Spec:
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

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


def data_fingerprint(manifest: Dict[str, Any], split: str = "train") -> str:
    """Identifies the shard set (names, counts, hashes): a cursor only applies to the same data."""
    entries = [(s["name"], s["sequences"], s.get("sha256", "")) for s in manifest["splits"][split]["shards"]]
    h = hashlib.sha256(repr((manifest["seq_len"], manifest.get("tokenizer", {}).get("sha256"), entries)).encode())
    return h.hexdigest()[:16]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 64) for k in key])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return _rng(seed, epoch, 0x0D0E).permutation(n)


def row_permutation(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    return _rng(seed, epoch, shard, 0x5E0).permutation(count)


def plan_slots(order: Sequence[int], counts: Sequence[int], slots: int) -> Tuple[List[List[Segment]], int, int]:
    """Deal shards to slots (see the module docstring). Returns (segments per slot, rounds, usable length)."""
    order = [int(s) for s in order]
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
    return segs, rounds, length


@dataclass
class _EpochPlan:
    segments: List[List[Segment]]
    seg_starts: List[List[int]]  # cumulative start of each segment in its slot's stream
    rounds: int
    batches_per_slot: int


class _Planner:
    """Caches epoch plans: cheap to compute, but asked for on every batch."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        self._cache: OrderedDict[Tuple[int, int], _EpochPlan] = OrderedDict()

    def plan(self, epoch: int, skip: int) -> _EpochPlan:
        key = (epoch, skip)
        if key not in self._cache:
            order = epoch_order(self.spec.seed, epoch, len(self.spec.counts))[skip:]
            segs, rounds, length = plan_slots(order, self.spec.counts, self.spec.slots)
            starts = [list(np.cumsum([0] + [hi - lo for _, lo, hi in seg])[:-1]) for seg in segs]
            self._cache[key] = _EpochPlan(segs, starts, rounds, length // self.spec.batch)
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[key]

    def rank_batches(self, epoch: int, skip: int) -> int:
        return self.plan(epoch, skip).batches_per_slot * self.spec.workers


class _ShardReader:
    """Loads (and caches a few) shards for one worker, permuted for the epoch, with corrupt handling."""

    def __init__(self, spec: _Spec, cache_size: int = 3):
        self.spec = spec
        self.cache: OrderedDict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_size = cache_size
        self.bad: Dict[int, str] = {}
        self.corrupt_skipped = 0

    def _read(self, s: int) -> np.ndarray:
        sp = self.spec
        return shardlib.read_shard(
            sp.urls[s],
            name=sp.names[s],
            dtype=sp.dtype,
            seq_len=sp.seq_len,
            sequences=sp.counts[s],
            vocab_size=sp.vocab_size,
            sequences_per_block=sp.sequences_per_block,
            allow_pipe=sp.allow_pipe,
        )

    def _read_or_substitute(self, s: int) -> Tuple[np.ndarray, np.ndarray]:
        """Rows and their global ids; a corrupt shard is replaced by the next readable one."""
        sp = self.spec
        n = len(sp.counts)
        for step in range(n):
            t = (s + step) % n
            if t in self.bad:
                continue
            try:
                rows = self._read(t)
            except shardlib.CorruptShardError as err:
                if sp.on_corrupt != "skip":
                    raise
                self.bad[t] = str(err)
                self.corrupt_skipped += 1
                log.warning("skipping corrupt shard (%d so far in this worker): %s", self.corrupt_skipped, err)
                continue
            uids = sp.bases[t] + np.arange(len(rows), dtype=np.int64)
            if t != s:
                log.warning(
                    "shard %s is replaced by repeats of %s to keep batch counts equal", sp.names[s], sp.names[t]
                )
                take = np.arange(sp.counts[s]) % max(1, len(rows))
                rows, uids = rows[take], uids[take]
            return rows, uids
        raise RuntimeError("no readable training shard left (data.on_corrupt=skip skipped all of them)")

    def get(self, epoch: int, s: int) -> Tuple[np.ndarray, np.ndarray]:
        key = (epoch, s)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        rows, uids = self._read_or_substitute(s)
        perm = row_permutation(self.spec.seed, epoch, s, len(rows))
        self.cache[key] = (rows[perm], uids[perm])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return self.cache[key]


@dataclass
class Cursor:
    epoch: int = 0
    skip_shards: int = 0  # leading shards of this epoch's order already consumed (after a re-split)
    batches_in_epoch: int = 0  # batches this rank has handed out in the epoch
    batches: int = 0  # total batches this rank has handed out
    sequences: int = 0  # total sequences consumed by all ranks together


class _TrainStream(torch.utils.data.IterableDataset):
    """Yields one rank's batches. In DataLoader worker i it yields the rank's batches
    ``start + i, start + i + W, …``, which is exactly worker ``(start + i) mod W``'s share."""

    def __init__(self, spec: _Spec, start: Cursor):
        super().__init__()
        self.spec, self.start = spec, start

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        phys, nphys = (info.id, info.num_workers) if info is not None else (0, 1)
        sp = self.spec
        if nphys not in (1, sp.workers):
            raise RuntimeError(f"DataLoader has {nphys} workers, the plan expects {sp.workers}")
        planner, reader = _Planner(sp), _ShardReader(sp)
        masker = Masker(sp.vocab_size, sp.special.values(), sp.special["mask"], sp.mask_prob)
        epoch, skip, x = self.start.epoch, self.start.skip_shards, self.start.batches_in_epoch + phys
        while True:
            plan = planner.plan(epoch, skip)
            total = plan.batches_per_slot * sp.workers
            if total == 0 and skip == 0:
                raise RuntimeError("an epoch holds no complete batch (see train_loader's checks)")
            key = stream_key(sp.seed, epoch)
            while x < total:
                w, j = x % sp.workers, x // sp.workers
                yield _make_batch(sp, plan, reader, masker, key, epoch, sp.rank * sp.workers + w, j)
                x += nphys
            x -= total
            epoch, skip = epoch + 1, 0


def _make_batch(
    sp: _Spec, plan: _EpochPlan, reader: _ShardReader, masker: Masker, key: int, epoch: int, slot: int, j: int
) -> Dict[str, torch.Tensor]:
    segs, starts = plan.segments[slot], plan.seg_starts[slot]
    lo, hi = j * sp.batch, (j + 1) * sp.batch
    rows_parts, uid_parts = [], []
    i = bisect.bisect_right(starts, lo) - 1
    while lo < hi:
        shard, a, b = segs[i]
        off = lo - starts[i]
        n = min(hi - lo, (b - a) - off)
        rows, uids = reader.get(epoch, shard)
        rows_parts.append(rows[a + off : a + off + n])
        uid_parts.append(uids[a + off : a + off + n])
        lo += n
        i += 1
    ids = rows_parts[0] if len(rows_parts) == 1 else np.concatenate(rows_parts)
    uids = uid_parts[0] if len(uid_parts) == 1 else np.concatenate(uid_parts)
    return _to_batch(masker(ids, uids, key), ids, sp.special["pad"])


def _to_batch(masked: Dict[str, np.ndarray], ids: np.ndarray, pad_id: int) -> Dict[str, torch.Tensor]:
    batch = {"input_ids": torch.from_numpy(masked["input_ids"]), "labels": torch.from_numpy(masked["labels"])}
    real = ids != pad_id
    # Packed data has pads only in a split's last sequence. A batch without pads carries no mask, so
    # attention (BERT's, the hypernetwork's) can take SDPA's flash kernel, which accepts no mask.
    if not real.all():
        batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers do numpy work; don't fight the trainer for cores


class TrainLoader:
    """Infinite iterator of training batches for one rank; ``state_dict()`` is the resume cursor."""

    def __init__(
        self, spec: _Spec, cursor: Cursor, num_workers: int, multiprocessing_context=None, prefetch_factor: int = 4
    ):
        self.spec = spec
        self.cursor = cursor
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor
        self._planner = _Planner(spec)
        self._normalize()

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        return self._planner.rank_batches(self.cursor.epoch, self.cursor.skip_shards)

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def _normalize(self) -> None:
        c = self.cursor
        while c.skip_shards and c.batches_in_epoch >= self._planner.rank_batches(c.epoch, c.skip_shards):
            c.epoch, c.skip_shards, c.batches_in_epoch = c.epoch + 1, 0, 0  # a re-split left nothing here

    def _advance(self) -> None:
        c = self.cursor
        c.batches += 1
        c.batches_in_epoch += 1
        c.sequences += self.spec.batch * self.spec.world_size
        if c.batches_in_epoch >= self._planner.rank_batches(c.epoch, c.skip_shards):
            c.epoch, c.skip_shards, c.batches_in_epoch = c.epoch + 1, 0, 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        stream = _TrainStream(self.spec, Cursor(**vars(self.cursor)))
        if self.num_workers == 0:
            it = iter(stream)
        else:
            dl = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=True,
                prefetch_factor=self.prefetch_factor,
                worker_init_fn=_worker_init,
                multiprocessing_context=self.multiprocessing_context,
                # Its own generator: the base seed it draws must not consume the global torch RNG,
                # which drives dropout and is restored exactly on resume.
                generator=torch.Generator().manual_seed(self.spec.seed),
            )
            it = iter(dl)
        try:
            for batch in it:
                self._advance()  # the cursor is "after this batch" as soon as the caller holds it
                yield batch
        finally:
            del it  # shuts the workers down when the caller stops iterating

    def state_dict(self) -> Dict[str, Any]:
        sp = self.spec
        return {
            "version": CURSOR_VERSION,
            "seed": sp.seed,
            "world_size": sp.world_size,
            "num_workers": self.num_workers,
            "micro_batch_size": sp.batch,
            "data": sp.fingerprint,
            **vars(self.cursor),
        }


def _resplit(state: Dict[str, Any], spec: _Spec) -> Cursor:
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


def _spec(
    data_cfg, manifest: Dict[str, Any], split: str, seed: int, rank: int, world_size: int, workers: int, batch: int
) -> _Spec:
    shards = manifest["splits"].get(split, {}).get("shards", [])
    counts = tuple(int(s["sequences"]) for s in shards)
    bases = tuple(int(b) for b in np.cumsum((0,) + counts)[:-1])
    if data_cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt={data_cfg.on_corrupt!r} must be 'skip' or 'fail'")
    return _Spec(
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
    )


def _with_location(data_cfg, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest with the caller's data.output as its location (never a location from a file)."""
    if "location" in manifest:
        return manifest
    from scale_hyper.data import storage

    out = dict(manifest)
    out["location"] = storage.local_path(data_cfg.output) if storage.is_local(data_cfg.output) else data_cfg.output
    return out


def _check_world(rank: int, world_size: int, micro_batch_size: int) -> None:
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


def train_loader(
    data_cfg,
    manifest: Dict[str, Any],
    seed: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    state: Optional[Dict[str, Any]] = None,
    multiprocessing_context=None,
) -> TrainLoader:
    """The training batches of one rank; see the module docstring for layout and resume rules."""
    _check_world(rank, world_size, micro_batch_size)
    manifest = _with_location(data_cfg, manifest)
    workers = int(data_cfg.num_workers)
    if workers < 0:
        raise ValueError(f"data.num_workers={workers} must be >= 0")
    spec = _spec(data_cfg, manifest, "train", seed, rank, world_size, workers, micro_batch_size)
    n = len(spec.counts)
    if n < spec.slots:
        raise ValueError(
            f"{n} training shard(s) at {manifest['location']} cannot feed world_size={world_size} × "
            f"data.num_workers={max(1, workers)} = {spec.slots} readers (each needs at least one shard). "
            f"Lower data.num_workers, or re-prepare into a new data.output with a larger data.min_shards "
            f"(>= {spec.slots}) or a smaller data.sequences_per_shard"
        )
    first = _Planner(spec).plan(0, 0)
    if first.batches_per_slot == 0:
        raise ValueError(
            f"{sum(spec.counts)} training sequences are too few for {spec.slots} readers × micro_batch_size="
            f"{micro_batch_size}; use a smaller batch, fewer workers, or more data"
        )
    cursor = Cursor()
    if state is not None:
        cursor = _cursor_from_state(state, spec)
    return TrainLoader(spec, cursor, workers, multiprocessing_context=multiprocessing_context)


def resplit_cursor(cursors: Sequence[Optional[Dict[str, Any]]], rank: int, world_size: int) -> Dict[str, Any]:
    """The cursor to resume ``rank`` of ``world_size`` from the cursors all ranks saved.

    Cursors are rank-independent (ranks move in lock-step), so any saved one serves every rank; a
    different world size is re-split by ``train_loader(state=...)`` itself (module docstring).
    """
    saved = [c for c in cursors if c]
    if not saved:
        raise ValueError("no data cursor was saved in the checkpoint")
    first = saved[0]
    if any(c != first for c in saved[1:]):
        raise ValueError("the saved data cursors disagree across ranks; the checkpoint's ranks were not in lock-step")
    return dict(first)


def _cursor_from_state(state: Dict[str, Any], spec: _Spec) -> Cursor:
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


# --- validation --------------------------------------------------------------------------------


class ValLoader:
    """A finite, deterministic, re-iterable list of validation batches for one rank.

    Sequence ``i`` of the validation split goes to rank ``i mod world_size``; every rank gets the
    same number of batches (``N // world_size`` sequences each, the last batch possibly smaller),
    capped by ``max_batches``. Masks are fixed (their own seed, epoch 0), so every evaluation of
    every run sees the same masked tokens. Read in the calling process, once, and kept in memory:
    only the shards needed for ``max_batches`` are read.
    """

    def __init__(self, spec: _Spec, max_batches: Optional[int]):
        self.spec = spec
        total = sum(spec.counts)
        per_rank = total // spec.world_size
        n = -(-per_rank // spec.batch) if per_rank else 0
        if max_batches:
            n = min(n, int(max_batches))
        self.num_batches = n
        self.per_rank = min(per_rank, n * spec.batch)
        self._batches: Optional[List[Dict[str, torch.Tensor]]] = None
        if total and not per_rank:
            raise ValueError(f"{total} validation sequences cannot be shared by world_size={spec.world_size} ranks")
        if not total:
            log.warning("no validation data (data.val_fraction=0 or a tiny corpus): the validation loader is empty")

    def __len__(self) -> int:
        return self.num_batches

    def _load(self) -> List[Dict[str, torch.Tensor]]:
        sp = self.spec
        need = self.per_rank * sp.world_size  # global rows 0 .. need-1, strided by rank
        reader = _ShardReader(sp, cache_size=1)
        rows, uids, have = [], [], 0
        for s in range(len(sp.counts)):
            if have >= need:
                break
            r, u = reader._read_or_substitute(s)
            rows.append(r)
            uids.append(u)
            have += len(r)
        ids = np.concatenate(rows)[:need][sp.rank :: sp.world_size]
        gid = np.concatenate(uids)[:need][sp.rank :: sp.world_size]
        masker = Masker(sp.vocab_size, sp.special.values(), sp.special["mask"], sp.mask_prob)
        key = stream_key(_VAL_SEED, 0, salt=1)
        out = []
        for j in range(self.num_batches):
            b_ids, b_uid = ids[j * sp.batch : (j + 1) * sp.batch], gid[j * sp.batch : (j + 1) * sp.batch]
            out.append(_to_batch(masker(b_ids, b_uid, key), b_ids, sp.special["pad"]))
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self._batches is None:
            self._batches = self._load() if self.num_batches else []
        # fresh tensors each pass, so a caller that modifies a batch in place cannot change the next eval
        return iter([{k: v.clone() for k, v in b.items()} for b in self._batches])


def val_loader(
    data_cfg,
    manifest: Dict[str, Any],
    rank: int,
    world_size: int,
    micro_batch_size: int,
    max_batches: Optional[int] = None,
) -> ValLoader:
    """The validation batches of one rank (finite, deterministic, re-iterable; ``len()`` works)."""
    _check_world(rank, world_size, micro_batch_size)
    manifest = _with_location(data_cfg, manifest)
    spec = _spec(data_cfg, manifest, "val", _VAL_SEED, rank, world_size, 1, micro_batch_size)
    return ValLoader(spec, max_batches)
