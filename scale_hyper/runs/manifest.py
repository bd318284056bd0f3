"""Checkpoint manifests: what a checkpoint's files were when they were written, and whether they still are.

At a save every rank hashes the files it wrote, right after writing each one (``Hasher``); rank 0 then
writes ``manifest.json`` (each file's size and xxh3_64 checksum, which rank wrote it, the step and the
world size) and, last, the marker, which records the manifest's checksum and one of its own
(``seal``). Before anything loads a checkpoint, ``verify`` compares it with its manifest:

* ``full`` (default): every file's size and checksum; ``sizes``: one ``stat`` per file; ``off``: nothing.
* *intact*: everything matches. *damaged*: a file is missing, has another size or other bytes, or the
  manifest or marker do not match what was recorded (a marker that records a manifest which is gone
  counts: nothing says which files belong then). *unverifiable*: saved before manifests existed (its
  marker records none); such a checkpoint still loads, with a one-line warning.

xxh3_64 from python-xxhash (already installed as a dependency of ``datasets``; maintained, wheels for
every platform): ~4.5 GB/s on one core here, faster than the storage it reads, so a full check costs
about what reading the files costs; 64 bits are ample to detect damage. A manifest detects damage,
not tampering: whoever can rewrite the files can rewrite it too (docs/engine.md on untrusted checkpoints).

Readers (export, eval, GLUE, transplant, ``train.init_from``, ``checkpoint universal``) go through
``find_intact``; the trainer's resume (``engine/resume.py``) runs ``verify`` on every rank;
``checkpoint verify`` prints it (``verify_report``).
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import xxhash

from scale_hyper.runs.layout import (
    MARKER,
    PathLike,
    RunDir,
    complete_checkpoints,
    find_checkpoint,
    is_checkpoint,
)
from scale_hyper.runs.layout import warn as _warn  # the readers' one warning line

ALGORITHM = "xxh3_64"
MANIFEST = "manifest.json"
SEAL = "marker_" + ALGORITHM  # the marker's checksum of its own other fields
MODES = ("full", "sizes", "off")
INTACT, DAMAGED, UNVERIFIABLE, UNCHECKED = "intact", "damaged", "unverifiable", "unchecked"
_CHUNK = 16 << 20


class DamagedCheckpointError(ValueError):
    """A checkpoint that does not match its manifest; the message names the file, what differs, the fix."""

    user_error = True


def checksum_file(path: PathLike) -> str:
    """xxh3_64 of a file, read through mmap (no copy: twice the speed of read() here), or in chunks
    where a filesystem cannot map it."""
    digest = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
                return digest.hexdigest()
        except (OSError, ValueError):  # an empty file, or a filesystem without mmap
            f.seek(0)
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                digest.update(view[:n])
    return digest.hexdigest()


def _checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _entry(path: Path) -> Dict[str, Any]:
    return {"size": path.stat().st_size, ALGORITHM: checksum_file(path)}


class Hasher:
    """One rank's files of one save, each hashed in a background thread as soon as it is written, so
    hashing a file overlaps with writing the next one."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = Path(ckpt)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scale-hyper-checksum")
        self._jobs: Dict[str, Future] = {}

    def add(self, path: PathLike) -> None:
        rel = Path(os.path.relpath(path, self.ckpt)).as_posix()
        if rel not in self._jobs:
            self._jobs[rel] = self._pool.submit(_entry, self.ckpt / rel)

    def entries(self) -> Dict[str, Dict[str, Any]]:
        """Waits for every file added; raises the first error met reading one."""
        try:
            return {rel: job.result() for rel, job in sorted(self._jobs.items())}
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def write(ckpt: Path, per_rank: Sequence[Dict[str, Dict[str, Any]]], step: int, world_size: int) -> str:
    """Rank 0, once every rank's files are complete: ``manifest.json`` from the ranks' entries (a file no
    rank reported, e.g. one written outside DeepSpeed's checkpoint engine, is hashed here); returns its
    checksum, which the marker records."""
    ckpt = Path(ckpt)
    files: Dict[str, Dict[str, Any]] = {}
    for rank, entries in enumerate(per_rank):
        for rel, entry in entries.items():
            files[rel] = {**entry, "rank": rank}
    skip = {MANIFEST, MANIFEST + ".tmp", MARKER, MARKER + ".tmp"}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt).as_posix()
        if rel not in files and rel not in skip:
            files[rel] = {**_entry(path), "rank": 0}
    body = json.dumps(
        {
            "format": 1,
            "algorithm": ALGORITHM,
            "step": step,
            "world_size": world_size,
            "files": dict(sorted(files.items())),
        },
        indent=1,
    ).encode()
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, ckpt / MANIFEST)
    return _checksum_bytes(body)


def _state_digest(state: Dict[str, Any]) -> str:
    return _checksum_bytes(json.dumps({k: v for k, v in state.items() if k != SEAL}, sort_keys=True).encode())


def seal(state: Dict[str, Any], manifest_checksum: str) -> Dict[str, Any]:
    """The marker's content: ``state``, the manifest's checksum, and a checksum of both."""
    out = {k: v for k, v in state.items() if k not in (SEAL, "manifest")}
    out["manifest"] = {"file": MANIFEST, ALGORITHM: manifest_checksum}
    out[SEAL] = _state_digest(out)
    return out


@dataclass
class Verdict:
    """What ``verify`` found in one checkpoint."""

    ckpt: Path
    status: str  # intact | damaged | unverifiable | unchecked
    problems: List[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def usable(self) -> bool:
        return self.status != DAMAGED

    def what(self) -> str:
        """The first problem, and how many more (one line)."""
        if not self.problems:
            return ""
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _owner(entry: Dict[str, Any], index: int, world: int, by_writer: bool) -> int:
    """Which rank of the checking world re-reads a file: the one that wrote it when the checkpoint was
    saved by as many ranks (its files may still be in that node's page cache), else every world-th."""
    return int(entry.get("rank", index)) % world if by_writer else index % world


def verify(ckpt: PathLike, mode: str = "full", share: Tuple[int, int] = (0, 1)) -> Verdict:
    """Check ``ckpt`` against its manifest. ``share=(rank, world)``: sizes are checked by every rank,
    checksums only for the files this rank owns (``merge`` combines the ranks' verdicts)."""
    ckpt = Path(ckpt)
    if mode == "off":
        return Verdict(ckpt, UNCHECKED)
    try:
        state = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError) as err:
        return Verdict(ckpt, DAMAGED, [f"{MARKER} is unreadable ({' '.join(str(err).split())[:120]})"])
    record = state.get("manifest")
    if not isinstance(record, dict):
        return Verdict(ckpt, UNVERIFIABLE, ["saved before checkpoint manifests existed: nothing to check it against"])
    problems = []
    if SEAL in state and state[SEAL] != _state_digest(state):
        problems.append(f"{MARKER} does not match its own {ALGORITHM} checksum (its bytes changed)")
    try:
        body = (ckpt / MANIFEST).read_bytes()
        manifest = json.loads(body)
    except FileNotFoundError:
        return Verdict(ckpt, DAMAGED, [*problems, f"{MANIFEST} is missing ({MARKER} records one)"])
    except (OSError, ValueError) as err:
        return Verdict(ckpt, DAMAGED, [*problems, f"{MANIFEST} is unreadable ({' '.join(str(err).split())[:120]})"])
    if _checksum_bytes(body) != record.get(ALGORITHM):
        problems.append(f"{MANIFEST} has {ALGORITHM} {_checksum_bytes(body)}, {MARKER} records {record.get(ALGORITHM)}")
    if manifest.get("step") != state.get("step"):
        problems.append(f"{MANIFEST} is of step {manifest.get('step')}, {MARKER} of step {state.get('step')}")
    if manifest.get("algorithm") != ALGORITHM:
        problems.append(f"{MANIFEST} uses checksum {manifest.get('algorithm')!r}, this version reads {ALGORITHM}")
    files: Dict[str, Dict[str, Any]] = manifest.get("files", {})
    by_writer = manifest.get("world_size") == share[1] and not state.get("universal")
    total = 0
    for index, (rel, entry) in enumerate(sorted(files.items())):
        try:
            size = (ckpt / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        total += size
        expected, recorded = entry.get("size"), entry.get(ALGORITHM)
        if size != expected:
            problems.append(f"{rel} is {size:,} bytes, the manifest says {expected:,}" if isinstance(expected, int)
                            else f"{rel} has no size in the manifest")  # fmt: skip
        elif mode == "full" and _owner(entry, index, share[1], by_writer) == share[0]:
            actual = checksum_file(ckpt / rel)
            if actual != recorded:
                problems.append(
                    f"{rel} has {ALGORITHM} {actual}, the manifest says {recorded} (same size: bytes changed)"
                )
    return Verdict(ckpt, DAMAGED if problems else INTACT, problems, len(files), total)


def merge(verdicts: Sequence[Verdict]) -> Verdict:
    """The verdict of all ranks' shares together (the same on every rank that merges the same list)."""
    first = verdicts[0]
    problems = list(dict.fromkeys(p for v in verdicts for p in v.problems))
    status = DAMAGED if any(v.status == DAMAGED for v in verdicts) else first.status
    return Verdict(first.ckpt, status, problems, first.files, first.bytes)


def newest_first(path: PathLike) -> List[Path]:
    """Complete checkpoints of a run directory or of DeepSpeed's save directory, newest first."""
    p = Path(path)
    for save_dir in (p, RunDir(p).checkpoints):
        found = complete_checkpoints(save_dir)
        if found:
            return found[::-1]
    return []


def newest_sized(path: PathLike) -> Optional[Path]:
    """The newest checkpoint whose files all have the sizes its manifest records (stat only, no reads):
    what a hung or failed run names for its rerun, which verifies it fully before loading."""
    for ckpt in newest_first(path):
        if verify(ckpt, "sizes").usable:
            return ckpt
    return None


def unverifiable_warning(ckpt: Path) -> str:
    return f"checkpoint {ckpt} has no manifest (saved before scale-hyper wrote them): loading it unverified"


def damaged_error(verdict: Verdict) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint {verdict.ckpt} is damaged: {verdict.what()} — use an intact one: pass the run directory "
        f"(the newest checkpoint that verifies is taken) or another step_N (`scale-hyper checkpoint verify "
        f"{verdict.ckpt.parent}` lists them); train.verify_checkpoint=off loads it unchecked"
    )


_verified: Dict[Tuple[str, str, int], Verdict] = {}
_warned: set = set()


def _verify_once(ckpt: Path, mode: str) -> Verdict:
    """``verify``, remembered per process (init_from resolves its source three times): keyed on the
    marker's mtime, so a checkpoint rewritten since is checked again."""
    try:
        stamp = (ckpt / MARKER).stat().st_mtime_ns
    except OSError:
        stamp = -1
    key = (str(ckpt.absolute()), mode, stamp)
    if key not in _verified:
        _verified[key] = verify(ckpt, mode)
        if _verified[key].status == UNVERIFIABLE:
            _warn(unverifiable_warning(ckpt))
    return _verified[key]


def find_intact(path: PathLike, mode: str = "full", warn: Callable[[str], None] = _warn) -> Path:
    """The checkpoint ``path`` means, verified: a checkpoint itself (refused when damaged), or the newest
    checkpoint of a run or save directory that verifies (each newer damaged one said in one line)."""
    p = Path(path)
    if is_checkpoint(p):
        verdict = _verify_once(p, mode)
        if not verdict.usable:
            raise damaged_error(verdict)
        return p
    candidates = newest_first(p)
    if not candidates:
        return find_checkpoint(p)  # raises NoCheckpointError naming what was looked for
    damaged: List[Verdict] = []
    for ckpt in candidates:
        verdict = _verify_once(ckpt, mode)
        if verdict.usable:
            for bad in damaged:
                line = f"checkpoint {bad.ckpt} is damaged: {bad.what()} — using {ckpt} instead"
                if line not in _warned:  # said once per process, however often the source is resolved
                    _warned.add(line)
                    warn(line)
            return ckpt
        damaged.append(verdict)
    raise DamagedCheckpointError(
        f"every checkpoint under {p} is damaged (the newest, {damaged[0].ckpt.name}: {damaged[0].what()}) — "
        f"restore them from a copy, or load one unchecked with train.verify_checkpoint=off"
    )


def mode_from_args(args: Sequence[str], default: str = "full") -> str:
    """``train.verify_checkpoint=MODE`` among a reader's key=value arguments (checked before its config)."""
    mode = default
    for arg in args:
        if arg.startswith("train.verify_checkpoint="):
            mode = arg.split("=", 1)[1]
    if mode not in MODES:
        from scale_hyper.config.model import fail

        raise fail(
            f"train.verify_checkpoint={mode} is not one of {'|'.join(MODES)}", "e.g. train.verify_checkpoint=full"
        )
    return mode


def prunable(checkpoints: Sequence[Path], keep: int) -> List[Path]:
    """Which of ``checkpoints`` (oldest first) rotation deletes to keep ``keep``: all but the newest
    ``keep``, except that the newest intact one (by sizes) is spared while every kept one is damaged."""
    if keep <= 0 or len(checkpoints) <= keep:
        return []
    doomed, kept = list(checkpoints[:-keep]), checkpoints[-keep:]
    if any(verify(c, "sizes").usable for c in reversed(kept)):
        return doomed
    for ckpt in reversed(doomed):
        if verify(ckpt, "sizes").usable:
            doomed.remove(ckpt)
            break
    return doomed
