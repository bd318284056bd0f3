"""The streaming MLM training loader: an infinite, exactly resumable stream of batches per rank.

This module reads shards and streams batches; the epoch layout is computed in ``plan``, the
resume cursor lives in ``cursor``, and the finite validation set is ``validation``.

How the training stream is laid out (all of it a pure function of the manifest, ``seed``, the
epoch, ``world_size`` R, ``data.num_workers`` W and ``micro_batch_size`` B, so every rank computes
the same plan without talking to the others):

1. Shard order. Epoch ``e`` visits the train shards in the permutation drawn from ``(seed, e)``.
   The shuffle happens before any splitting, so shards move across ranks from epoch to epoch.
2. Slots. Each (rank, worker) pair is one of R × W slots (slot = rank × W + worker). Shards of
   `prepare` (manifest ``loader_deal: sequences``: full shards, the last of each slice shorter):
   the shards, in that order, are concatenated and cut into RW equal contiguous parts, one per
   slot: each slot reads a run of whole shards and at most a part of one at each end. Manifests
   without it (earlier versions, shards of equal size): whole shards are dealt round-robin, slot k
   gets shards k, k + RW, k + 2RW, …, and the last ``n mod RW`` shards are concatenated and cut
   into RW equal contiguous parts. Either way no shard is left out of an epoch.
3. Equal length. Every slot uses the same number of sequences, the smallest slot's count rounded
   down to whole batches; the few leftover sequences (fewer than RW × B, or, round-robin, what
   unequal shards leave over) are the only ones not seen in that epoch. Every rank therefore yields exactly the same number of
   batches per epoch: no rank runs dry first and leaves the others hanging in a collective.
4. Within a shard, sequences are visited in a permutation drawn from ``(seed, e, shard)``.
   A slot reads ``data.shards_per_worker`` (k) of its shards at once, one sequence from each in
   turn, and permutes each of those k streams in seeded windows (``data.shuffle_buffer``): see
   ``interleave``. Every micro-batch of a slot with ≥ k shards holds sequences of ≥ k shards.
5. Masks are a function of ``(seed, e, global sequence id, position)`` (see ``masking``).
6. Batch order. A rank's batches come round-robin from its W workers (what torch's DataLoader does):
   batch ``i`` of an epoch is batch ``i // W`` of worker ``i % W``. The epoch length in batches is a
   multiple of W, so this holds across epoch boundaries too.

Rank and world size are always explicit arguments; webdataset's environment-based splitting
(which silently gives every rank all data when only SLURM variables are set) is never used.

Cursor and resume. ``TrainLoader.state_dict()`` is ``{epoch, batches_in_epoch, resplits, …}``
after the last batch handed out. Ranks move in lock-step, so the cursor is the same on every rank
and rank 0's copy can resume all of them. With the same R, W and B, a resumed loader yields exactly
the batches the uninterrupted one would have (worker w is restarted at its own next batch and the
DataLoader's worker order is rotated so the first batch comes from the right worker).

With a different R, W or B (another world size, or another micro batch chosen for the same global
batch) the old layout cannot continue, and the cursor is re-split at sample granularity: each old
slot's stream after the sequences it consumed (a partly read shard, then its untouched shards) is
concatenated slot by slot and cut into equal contiguous parts, one per new slot
(``plan.slot_streams``); the cursor remembers the old layout (``resplits``), so further re-splits in
the same epoch chain. Within the epoch no sequence is read twice, and none is skipped beyond the
usual end-of-epoch remainder (fewer than new R × W × B sequences; measured in
``tests/test_data_loader.py``). Later epochs are laid out normally. A cursor from a different seed
or different data is rejected.

Shuffling is exact-resume friendly by construction (per-epoch shard order, per-epoch permutation
inside each shard, k shards interleaved, seeded shuffle windows): the read position alone says which
sequence comes next, so no sample buffer's contents need saving. ``data.shards_per_worker`` and
``data.shuffle_buffer`` are part of the layout: a resume that changes them is re-split like one that
changes the world size. ``data.mixture`` is served by ``mixture``. Keep one active iterator per
TrainLoader: each ``iter()`` starts from the current cursor.

Corrupt shards (unreadable, truncated, wrong count) are logged and, with ``data.on_corrupt=skip``,
replaced in place by the next readable shard in manifest order (its rows repeated to the same
count), so batch counts stay equal on every rank; ``fail`` raises. Token ids outside the
vocabulary always raise, naming the shard.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import signal
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from scale_hyper.data import shards as shardlib
from scale_hyper.data.cursor import Cursor, cursor_from_state, cursor_state
from scale_hyper.data.masking import Masker, stream_key
from scale_hyper.data.plan import (
    EpochPlan,
    LoaderSpec,
    Planner,
    build_spec,
    check_world,
    row_permutation,
    with_location,
)

log = logging.getLogger("scale_hyper.data")


class ShardReader:
    """Loads (and caches a few) shards for one worker, permuted for the epoch, with corrupt handling."""

    def __init__(self, spec: LoaderSpec, cache_size: int = 3):
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

    def read_or_substitute(self, s: int) -> Tuple[np.ndarray, np.ndarray]:
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
        raise shardlib.CorruptShardError(
            f"no readable training shard left ({len(self.bad)} of {len(self.spec.names)} unreadable, data.on_corrupt=skip) — "
            "re-create the shards with `scale-hyper prepare` into a new data.output, or set data.on_corrupt=fail "
            "to stop at the first bad one with its cause"
        )

    def get(self, epoch: int, s: int) -> Tuple[np.ndarray, np.ndarray]:
        key = (epoch, s)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        rows, uids = self.read_or_substitute(s)
        perm = row_permutation(self.spec.seed, epoch, s, len(rows))
        self.cache[key] = (rows[perm], uids[perm])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return self.cache[key]


class _TrainStream(torch.utils.data.IterableDataset):
    """Yields one rank's batches. In DataLoader worker i it yields the rank's batches
    ``start + i, start + i + W, …``, which is exactly worker ``(start + i) mod W``'s share."""

    def __init__(self, spec: LoaderSpec, start: Cursor):
        super().__init__()
        self.spec, self.start = spec, start

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        phys, nphys = (info.id, info.num_workers) if info is not None else (0, 1)
        sp = self.spec
        if nphys not in (1, sp.workers):
            raise RuntimeError(f"DataLoader has {nphys} workers, the plan expects {sp.workers}")
        planner, reader = Planner(sp), SlotRows(ShardReader(sp, cache_size=2 * sp.lanes + 1))
        masker = Masker(sp.vocab_size, sp.special.values(), sp.special["mask"], sp.mask_prob)
        epoch, skip, x = self.start.epoch, self.start.skip_shards, self.start.batches_in_epoch + phys
        resplits = [tuple(r) for r in self.start.resplits]
        while True:
            plan = planner.plan(epoch, skip, resplits)
            total = plan.batches_per_slot * sp.workers
            if total == 0 and skip == 0 and not resplits:
                raise RuntimeError("an epoch holds no complete batch (see train_loader's checks)")
            key = stream_key(sp.seed, epoch)
            while x < total:
                w, j = x % sp.workers, x // sp.workers
                yield _make_batch(sp, plan, reader, masker, key, epoch, sp.rank * sp.workers + w, j)
                x += nphys
            x -= total
            epoch, skip, resplits = epoch + 1, 0, []


class SlotRows:
    """A slot's rows in read order, gathered ``CHUNK_TOKENS`` tokens' worth of positions at a time: a
    worker reads its slot's positions in order, and one vectorised gather per chunk costs what one per
    batch would (2,048 sequences at S=128)."""

    CHUNK_TOKENS = 1 << 18

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self.key: Tuple[Any, ...] = ()
        self.lo = self.hi = 0
        self.rows = self.uids = np.empty(0)

    def get(self, plan: EpochPlan, epoch: int, slot: int, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.key != (id(plan), epoch, slot) or not self.lo <= lo < hi <= self.hi:
            chunk = max(1, self.CHUNK_TOKENS // self.reader.spec.seq_len)
            end = max(hi, min(lo + chunk, plan.orders[slot].used))
            self.rows, self.uids = slot_rows(plan, self.reader, epoch, slot, lo, end)
            self.key, self.lo, self.hi, self.plan = (id(plan), epoch, slot), lo, end, plan  # plan: keeps its id
        return self.rows[lo - self.lo : hi - self.lo], self.uids[lo - self.lo : hi - self.lo]


def _make_batch(
    sp: LoaderSpec, plan: EpochPlan, reader: SlotRows, masker: Masker, key: int, epoch: int, slot: int, j: int
) -> Dict[str, torch.Tensor]:
    ids, uids = reader.get(plan, epoch, slot, j * sp.batch, (j + 1) * sp.batch)
    return to_batch(masker(ids, uids, key), ids, sp.special["pad"])


def slot_rows(
    plan: EpochPlan, reader: ShardReader, epoch: int, slot: int, lo: int, hi: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and global ids of read positions [lo, hi) of ``slot`` in this epoch (``interleave``'s order)."""
    segs, starts, order = plan.segments[slot], plan.seg_starts[slot], plan.orders[slot]
    rows_parts, uid_parts = [], []
    if order.plain:  # one shard at a time: contiguous slices
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
        if len(rows_parts) == 1:
            return rows_parts[0], uid_parts[0]
        return np.concatenate(rows_parts), np.concatenate(uid_parts)
    raw = order.raw(np.arange(lo, hi, dtype=np.int64))
    seg = np.searchsorted(plan.start_arrays[slot], raw, side="right") - 1
    parts = []
    for g in np.unique(seg).tolist():
        sel = np.flatnonzero(seg == g)
        rows, uids = reader.get(epoch, segs[g][0])
        idx = segs[g][1] + raw[sel] - starts[g]
        parts.append((sel, rows[idx], uids[idx]))
    ids = np.empty((hi - lo, parts[0][1].shape[1]), dtype=parts[0][1].dtype)
    uids_out = np.empty(hi - lo, dtype=np.int64)
    for sel, r, u in parts:
        ids[sel], uids_out[sel] = r, u
    return ids, uids_out


def to_batch(masked: Dict[str, np.ndarray], ids: np.ndarray, pad_id: int) -> Dict[str, torch.Tensor]:
    batch = {"input_ids": torch.from_numpy(masked["input_ids"]), "labels": torch.from_numpy(masked["labels"])}
    real = ids != pad_id
    # Packed data has pads only in a split's last sequence. A batch without pads carries no mask, so
    # attention (BERT's, the hypernetwork's) can take SDPA's flash kernel, which accepts no mask.
    if not real.all():
        batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers do numpy work; don't fight the trainer for cores
    # A stop signal sent to the whole process group (scancel, preemption, `timeout`) reaches the
    # workers too: they must not die of it (torch would turn that into a crash of the trainer). The
    # trainer checkpoints and exits; TrainLoader.close (also at interpreter exit) ends them.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _close_at_exit(ref: weakref.ref[TrainLoader]) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class TrainLoader:
    """Infinite iterator of training batches for one rank; ``state_dict()`` is the resume cursor."""

    def __init__(
        self, spec: LoaderSpec, cursor: Cursor, num_workers: int, multiprocessing_context=None, prefetch_factor: int = 4
    ):
        self.spec = spec
        self.cursor = cursor
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.prefetch_factor = prefetch_factor
        self._planner = Planner(spec)
        self._workers: Any = None  # the live DataLoader iterator (its worker processes), if any
        atexit.register(_close_at_exit, weakref.ref(self))
        self._normalize()

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        return self._planner.rank_batches(self.cursor.epoch, self.cursor.skip_shards, self.cursor.resplits)

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def _normalize(self) -> None:
        c = self.cursor
        while (c.skip_shards or c.resplits) and c.batches_in_epoch >= self.batches_per_epoch:
            c.epoch, c.skip_shards, c.batches_in_epoch, c.resplits = c.epoch + 1, 0, 0, []  # a re-split left nothing

    def _advance(self) -> None:
        c = self.cursor
        c.batches += 1
        c.batches_in_epoch += 1
        c.sequences += self.spec.batch * self.spec.world_size
        if c.batches_in_epoch >= self.batches_per_epoch:
            c.epoch, c.skip_shards, c.batches_in_epoch, c.resplits = c.epoch + 1, 0, 0, []

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        stream = self._stream()
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
            self._workers = it
        try:
            for batch in it:
                self._advance()  # the cursor is "after this batch" as soon as the caller holds it
                yield batch
        finally:
            del it  # shuts the workers down when the caller stops iterating
            self.close()

    def _stream(self) -> torch.utils.data.IterableDataset:
        return _TrainStream(self.spec, Cursor(**vars(self.cursor)))

    def close(self) -> None:
        """Stop the worker processes now. They ignore SIGTERM (see _worker_init), so this — not the
        terminate() multiprocessing sends at interpreter exit — is how they end; registered with
        atexit, which runs it before multiprocessing's own exit handler."""
        workers, self._workers = self._workers, None
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()

    def state_dict(self) -> Dict[str, Any]:
        return cursor_state(self.spec, self.num_workers, self.cursor)


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
    check_world(rank, world_size, micro_batch_size)
    if getattr(data_cfg, "mixture", None):  # data.mixture: the sources' own manifests, not data.output's
        from scale_hyper.data.mixture import mixture_loader

        return mixture_loader(data_cfg, seed, rank, world_size, micro_batch_size, state, multiprocessing_context)
    manifest = with_location(data_cfg, manifest)
    workers = int(data_cfg.num_workers)
    if workers < 0:
        raise ValueError(f"data.num_workers={workers} must be >= 0")
    spec = build_spec(data_cfg, manifest, "train", seed, rank, world_size, workers, micro_batch_size)
    n = len(spec.counts)
    if n < spec.slots:
        raise ValueError(
            f"{n} training shard(s) at {manifest['location']} cannot feed world_size={world_size} × "
            f"data.num_workers={max(1, workers)} = {spec.slots} readers (each needs at least one shard). "
            f"Lower data.num_workers, or re-prepare into a new data.output with a larger data.min_shards "
            f"(>= {spec.slots}) or a smaller data.sequences_per_shard"
        )
    first = Planner(spec).plan(0, 0)
    if first.batches_per_slot == 0:
        raise ValueError(
            f"{sum(spec.counts)} training sequences are too few for {spec.slots} readers × micro_batch_size="
            f"{micro_batch_size}; use a smaller batch, fewer workers, or more data"
        )
    cursor = Cursor()
    if state is not None:
        cursor = cursor_from_state(state, spec)
    return TrainLoader(spec, cursor, workers, multiprocessing_context=multiprocessing_context)
