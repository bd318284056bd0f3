"""The read order inside one loader slot: k shards at once, and a shuffle buffer, both exactly resumable.

A slot's stream (``plan.slot_streams``) is its shards one after the other; read in that order, a
micro-batch would hold sequences of one shard (two at a boundary). ``SlotOrder`` reads it instead as
``lanes`` (``data.shards_per_worker``, k) equal contiguous parts of the stream's used length, taken
round-robin one sequence each: read position p comes from lane ``p mod k``. A slot holding m shards of
c sequences reads lane i's shards i·m/k … while the other lanes read theirs; whenever the used length
is at least k·c (a slot of ≥ k full shards), the lanes are always in k different shards, so every
micro-batch of B ≥ k sequences holds sequences of ≥ k different shards.

The shuffle buffer (``data.shuffle_buffer``, N) then permutes each lane in consecutive windows of
N / k sequences (a seeded permutation per (seed, epoch, slot, layout, lane, window)). That is what a
buffer of N sequences filled evenly from the k lanes does, without ever putting two sequences of the
same lane next to each other. Sequences inside a shard are already in a per-epoch random order, so
the buffer's job is to blend shard boundaries within a lane.

Everything is a pure function of the position: ``raw(positions)`` gives the stream index of any read
position without reading anything before it (resume skips straight to it), and ``unread(n)`` names
the stream indices positions ≥ n have not read yet (a re-split hands exactly those to the new layout).
With k = 1 and no buffer the order is the stream's own (the loader before this module existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import numpy as np

Run = Tuple[int, int]  # [start, end) in stream indices


@lru_cache(maxsize=256)
def _window_perm(key: Tuple[int, ...], size: int) -> np.ndarray:
    return np.random.default_rng([int(k) % (1 << 64) for k in key]).permutation(size)


@lru_cache(maxsize=64)
def _table(key: Tuple[int, ...], lanes: int, t: int, size: int) -> np.ndarray:
    """Window ``t``'s permutation of every lane, [lanes, size]."""
    return np.stack([_window_perm((*key, lane, t, 0xB0F), size) for lane in range(lanes)])


@dataclass(frozen=True)
class SlotOrder:
    used: int  # sequences of the slot's stream that are read in this epoch (whole batches)
    lanes: int  # k: stream parts read at once
    window: int  # sequences per lane window of the shuffle buffer; ≤ 1 = no shuffle
    key: Tuple[int, ...]  # (seed, epoch, slot, layout stage)

    @property
    def lane_len(self) -> int:
        return self.used // self.lanes

    @property
    def plain(self) -> bool:
        return self.lanes == 1 and self.window <= 1

    def lane_start(self, lane: np.ndarray) -> np.ndarray:
        return lane * self.lane_len + np.minimum(lane, self.used % self.lanes)

    def _shuffled(self, lane: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Lane index q after its window's permutation (q < lane_len only)."""
        w = self.window
        if w <= 1:
            return q
        t = q // w
        if t.min() == t.max():  # the usual case: one window
            t0 = int(t[0])
            return t0 * w + _table(self.key, self.lanes, t0, min(w, self.lane_len - t0 * w))[lane, q - t0 * w]
        out = q.copy()
        for tw in np.unique(t).tolist():
            sel = t == tw
            size = min(w, self.lane_len - tw * w)
            out[sel] = tw * w + _table(self.key, self.lanes, tw, size)[lane[sel], q[sel] - tw * w]
        return out

    def raw(self, pos: np.ndarray) -> np.ndarray:
        """Stream index of each read position in [0, used)."""
        if self.plain:
            return pos
        k, full = self.lanes, self.lanes * self.lane_len
        body = pos < full
        lane = np.where(body, pos % k, pos - full)  # past k·lane_len: the lanes' one extra sequence each
        q = np.where(body, pos // k, self.lane_len)
        if body.any():
            q[body] = self._shuffled(lane[body], q[body])
        return self.lane_start(lane) + q

    def unread(self, n: int) -> List[Run]:
        """The stream indices in [0, used) that read positions ≥ n hold, as runs in stream order."""
        if self.plain or n <= 0:
            return [(n, self.used)] if n < self.used else []
        k, ll, extra = self.lanes, self.lane_len, self.used % self.lanes
        runs: List[Run] = []
        for lane in range(k):
            start = int(self.lane_start(np.array(lane)))
            taken = min(ll, max(0, -(-(n - lane) // k)))  # lane indices read among positions < n
            lane_runs: List[Run] = []
            if taken < ll:
                if self.window > 1:
                    lo = (taken // self.window) * self.window
                    size = min(self.window, ll - lo)
                    read = _window_perm((*self.key, lane, taken // self.window, 0xB0F), size)[: taken - lo]
                    left = np.setdiff1d(np.arange(size), read)  # sorted
                    lane_runs += [(lo + int(i), lo + int(i) + 1) for i in left]
                    lane_runs.append((lo + size, ll))
                else:
                    lane_runs.append((taken, ll))
            if lane < extra and n <= k * ll + lane:  # the lane's extra sequence, read at position k·ll + lane
                lane_runs.append((ll, ll + 1))
            runs += [(start + a, start + b) for a, b in lane_runs if a < b]
        return _merge(runs)


def _merge(runs: List[Run]) -> List[Run]:
    out: List[Run] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
