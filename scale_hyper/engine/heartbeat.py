"""Heartbeats: a rank that stops sending them for ``train.dist_timeout_minutes`` is named, and the job ends.

A collective cannot tell a frozen peer from a slow one, and its timeout is not even ours everywhere
(DeepSpeed's own process groups get torch's default, 30 min on gloo: see ``distributed.py``). So every
rank runs two daemon threads that never touch the training loop:

- the **beat** thread adds 1 to its rank's counter in the rendezvous store every ``interval`` and
  reads the counters it watches. Rank 0 watches every rank; the others watch rank 0 and rank 0's
  verdict. Store calls block while the store's host (rank 0's process, or torchrun's agent) is
  stopped — a TCPStore client's timeout covers waiting for a key, not an unanswered request — so
- the **judge** thread decides from timestamps only: a watched counter that has not moved for the
  timeout (measured on this rank's monotonic clock, so clocks of different nodes never meet) means
  that rank is silent. A store that stopped answering freezes rank 0's counter too, so a stopped rank 0
  is named by everyone without the store.

Then every live rank prints one line (silent ranks, its step, the newest checkpoint) and exits with
``HUNG_EXIT``; the launcher (srun --kill-on-bad-exit, torchrun, deepspeed) ends the job. When rank 0
decides, it publishes the verdict and the others print theirs before anyone exits (srun kills the
step at the first exit), so every survivor's log says what happened.

Why it does not fire on a slow rank: a long step, evaluation or save keeps the beat thread running
(torch, I/O and sleeps release the GIL; the interpreter hands it over every 5 ms), so a live rank
misses no beat; only a stopped process (SIGSTOP, a swapped-out or frozen node, a node gone without
closing its sockets) falls silent. A judge that was itself frozen (``scontrol suspend`` stops every
rank at once) restarts its clocks instead of naming everyone.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

HUNG_EXIT = 5  # the exit code of every live rank when a rank went silent (slurm/common.sh requeues on it)
_DONE = 1 << 40  # added to a counter by a rank that leaves normally: never named afterwards
_PREFIX = "scale_hyper/heartbeat/"
_LAST_WAIT_S = 60.0  # the longest rank 0 waits at the end for the other ranks to leave


@dataclass(frozen=True)
class Timings:
    """Derived from train.dist_timeout_minutes (docs/engine.md, "Hung ranks")."""

    timeout_s: float  # silence after which a rank is named
    interval_s: float  # one beat; the judge looks twice as often
    grace_s: float  # bound on naming latency after the timeout: read + judge + verdict + rendezvous
    collective_s: float  # process-group timeout: after the heartbeats, so a frozen rank is named first

    @classmethod
    def of(cls, timeout_minutes: float) -> Timings:
        timeout = 60.0 * timeout_minutes
        interval = min(5.0, max(0.5, timeout / 12))  # ≥ 12 beats per timeout; ≤ 5 s keeps the store quiet
        grace = 5 * interval
        return cls(timeout, interval, grace, timeout + 2 * grace)


def _where(step: Any) -> str:
    return "during setup" if step is None else f"after step {step}"


def _bounded(fn: Callable[[], Any], seconds: float, default: Any) -> Any:
    """fn() in a daemon thread; ``default`` when it raises or does not return in time (a store or file
    system that stopped answering must not stop the one who reports it)."""
    box: List[Any] = [default]

    def run() -> None:
        try:
            box[0] = fn()
        except Exception:
            pass

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return box[0]


def silent_ranks(seen: Dict[int, List[float]], now: float, last_look: float, timeout: float) -> Dict[int, float]:
    """Ranks whose counter has not changed for ``timeout`` seconds -> seconds of silence. ``seen`` maps a
    rank to [counter, when it last changed]; a rank that left normally (counter ≥ _DONE) is never
    silent. A judge that could not look for over half the timeout was frozen itself (the whole job
    suspended, this node swapped out): it knows nobody's silence, so every clock restarts now."""
    if now - last_look > timeout / 2:
        for entry in seen.values():
            entry[1] = now
    return {r: now - t for r, (v, t) in seen.items() if v < _DONE and now - t >= timeout}


class Heartbeats:
    def __init__(self, rank: int, world_size: int, timeout_minutes: float, newest_checkpoint: Callable[[], Any]):
        self.rank, self.world_size, self.timeout_minutes = rank, world_size, timeout_minutes
        self.t = Timings.of(timeout_minutes)
        self.newest_checkpoint = newest_checkpoint
        self.step: Callable[[], Any] = lambda: None  # the loop's last completed step, once it exists
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        self._seen: Dict[int, List[float]] = {}  # rank -> [counter, monotonic time it last changed]
        self._verdict: Optional[dict] = None
        self._lock, self._stop, self._acted = threading.Lock(), threading.Event(), False
        self._store: Any = None
        self._threads: List[threading.Thread] = []

    @staticmethod
    def _key(rank: int) -> str:
        return f"{_PREFIX}rank{rank}"

    def start(self) -> Heartbeats:
        if self.world_size < 2:
            return self
        import torch.distributed as dist

        default: Any = dist.distributed_c10d._get_default_store()
        self._store = default.clone()  # own connection: the main thread's store calls never queue behind ours
        self._store.add(self._key(self.rank), 1)
        for r in self.watched if self.rank == 0 else []:
            self._store.add(self._key(r), 0)  # exists from now on: multi_get never waits for a late starter
        now = time.monotonic()
        self._seen = {r: [-1.0, now] for r in self.watched}
        judge_store = default.clone()
        self._threads = [
            threading.Thread(target=self._beat, name="scale-hyper-heartbeat", daemon=True),
            threading.Thread(target=self._judge, args=(judge_store,), name="scale-hyper-hang-judge", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def follow(self, step: Callable[[], Any]) -> None:
        """What the message calls the current step, once the loop's state exists."""
        self.step = step

    def stop(self) -> None:
        """This rank leaves (normally or with its own error): nobody names it from now on."""
        if self._store is None or self._stop.is_set():
            return
        self._stop.set()
        _bounded(lambda: self._store.add(self._key(self.rank), _DONE), self.t.interval_s, None)
        # Joined, not left to the interpreter's exit: a daemon thread still inside a store call when
        # Python finalizes is unwound through C++ and aborts the process ("terminate called without an
        # active exception") after a successful run.
        for thread in self._threads:
            thread.join(self.t.interval_s)
        if self.rank == 0:
            _bounded(self._wait_for_the_others, _LAST_WAIT_S + 1, None)

    def _wait_for_the_others(self) -> None:
        """Rank 0 hosts the rendezvous store and is a peer in the last collectives: gone before the
        others, it fails their last collective or store call (a broken pipe: exit 4 after a checkpoint
        was saved). It leaves once every other rank has left, or stopped beating for 3 intervals (dead
        or hung: not waited for), or after _LAST_WAIT_S."""
        keys = [self._key(r) for r in self.watched]
        seen: Dict[int, List[float]] = {}
        deadline = time.monotonic() + _LAST_WAIT_S
        while time.monotonic() < deadline:
            now = time.monotonic()
            pending = []
            for r, v in zip(self.watched, (int(v) for v in self._store.multi_get(keys)), strict=True):
                if v >= _DONE:
                    continue
                if r not in seen or seen[r][0] != v:
                    seen[r] = [v, now]
                if now - seen[r][1] < 3 * self.t.interval_s:
                    pending.append(r)
            if not pending:
                return
            time.sleep(0.05)

    # --- the beat thread: the only one that waits on the store in a loop ------------------------------

    def _beat(self) -> None:
        store, mine = self._store, self._key(self.rank)
        while not self._stop.is_set():
            try:
                store.add(mine, 1)
                if self.rank == 0:
                    values = [int(v) for v in store.multi_get([self._key(r) for r in self.watched])]
                    verdict = None
                else:
                    values = [store.add(self._key(0), 0)]
                    verdict = json.loads(store.get(_PREFIX + "verdict")) if store.add(_PREFIX + "verdicts", 0) else None
            except Exception:  # the store's host is gone: its counter stays frozen, the judge decides
                values, verdict = None, None
            self._record(values, verdict)  # rank 0 leaves only after every rank left (_wait_for_the_others)
            self._stop.wait(self.t.interval_s)

    def _record(self, values: Optional[List[int]], verdict: Optional[dict]) -> None:
        now = time.monotonic()
        with self._lock:
            for r, v in zip(self.watched, values or [], strict=False):  # values: None if the store failed
                if v != self._seen[r][0]:
                    self._seen[r] = [float(v), now]
            self._verdict = verdict or self._verdict

    # --- the judge thread: timestamps only ------------------------------------------------------------

    def _judge(self, store: Any) -> None:
        tick, last = self.t.interval_s / 2, time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                silent = silent_ranks(self._seen, now, last, self.t.timeout_s)
                verdict = self._verdict
            last = now
            if verdict:
                self._end({int(r): s for r, s in verdict["silent"].items()}, store, verdict_from_rank0=True)
            elif silent:
                self._end(silent, store, verdict_from_rank0=False)

    def _end(self, silent: Dict[int, float], store: Any, verdict_from_rank0: bool) -> None:
        with self._lock:
            if self._acted or self._stop.is_set():
                return
            self._acted = True
        ranks = ", ".join(str(r) for r in sorted(silent))
        secs = max(silent.values())
        newest = _bounded(self.newest_checkpoint, 5.0, "unknown (the file system did not answer in 5 s)")
        host = " (it hosts the rendezvous store)" if 0 in silent and self.rank != 0 else ""
        print(
            f"scale-hyper: rank {self.rank}: no heartbeat from rank {ranks}{host} for {secs:.0f} s "
            f"(train.dist_timeout_minutes={self.timeout_minutes:g}): stopped, hung or its node is gone; "
            f"{_where(self.step())}; newest checkpoint: {newest or 'none'} — ending the job (exit {HUNG_EXIT}); "
            "rerun as is to resume from it (train.resume=auto)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        if self.rank == 0 or verdict_from_rank0:
            self._rendezvous(store, silent)
        else:  # the store may be gone with rank 0: give the other survivors time to print theirs
            time.sleep(2 * self.t.interval_s)
        os._exit(HUNG_EXIT)

    def _rendezvous(self, store: Any, silent: Dict[int, float]) -> None:
        """Rank 0 publishes its verdict; every survivor acknowledges after printing; nobody exits before
        all have (or 3 intervals passed), since the launcher kills the rest at the first exit."""

        def publish_and_wait() -> None:
            if self.rank == 0:
                store.set(_PREFIX + "verdict", json.dumps({"silent": {str(r): s for r, s in silent.items()}}))
                store.add(_PREFIX + "verdicts", 1)
            store.add(_PREFIX + "acks", 1)
            while store.add(_PREFIX + "acks", 0) < self.world_size - len(silent):
                time.sleep(0.05)

        _bounded(publish_and_wait, 3 * self.t.interval_s, None)

    # --- for the message of a collective that failed (exit 4) -----------------------------------------

    def dead_ranks(self) -> List[int]:
        """Other ranks whose counter did not move over 2.5 intervals (a live rank beats at least twice)."""
        if self._store is None:
            return []
        keys = {r: self._key(r) for r in range(self.world_size) if r != self.rank}

        def read() -> Optional[Dict[int, bytes]]:
            def fresh() -> Dict[int, bytes]:
                return dict(zip(keys, self._store.clone().multi_get(list(keys.values())), strict=True))

            return _bounded(fresh, self.t.interval_s, None)

        first = read()
        time.sleep(2.5 * self.t.interval_s)
        second = read()
        if first is None or second is None:
            return []
        return [r for r in keys if first[r] == second[r] and int(second[r]) < _DONE]
