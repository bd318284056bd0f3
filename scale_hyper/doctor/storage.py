"""Storage: write, fsync and read throughput of train.output_dir and data.output (every rank writes
its own file at the same time, as a checkpoint save does), and free space against the checkpoint size."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.data import storage
from scale_hyper.doctor.results import FAIL, PASS, SKIPPED, Result
from scale_hyper.runs import disk
from scale_hyper.runs.disk import human_bytes

BLOCK = 4 << 20


def checkpoint_bytes(run: RunConfig) -> int:
    """A checkpoint's size: weights (2 or 4 bytes) + fp32 master copy when mixed + Adam's 2 fp32 moments."""
    from scale_hyper.models import parameter_report

    params = int(parameter_report(run.model)["total_params"])
    mixed = run.deepspeed.precision in ("bf16", "fp16", "auto")
    return params * ((2 + 4) if mixed else 4) + params * 8


def checkpoint_room(run: RunConfig) -> int:
    """Bytes a run needs free: the checkpoints kept, plus the one being written before the oldest is pruned."""
    keep = run.train.keep_checkpoints or 3
    return checkpoint_bytes(run) * (keep + 1)


def free_bytes(path: Path) -> int:
    return disk.free_bytes(path)


def require_room(run: RunConfig) -> None:
    """Bad input, before anything runs: an output directory on a disk without room for one checkpoint."""
    out = Path(run.train.output_dir).absolute()
    need, free = checkpoint_bytes(run), free_bytes(out)
    if free < need:
        raise ConfigError(
            f"train.output_dir={run.train.output_dir} is on a full disk ({human_bytes(free)} free, one checkpoint "
            f"of this model needs about {human_bytes(need)}) — free space there or point train.output_dir elsewhere"
        )


def _probe(directory: Path, rank: int, size: int) -> Dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".doctor-probe.rank{rank}.{os.getpid()}"  # unique even for two doctors on one directory
    try:
        return _timed_write_read(path, size)
    finally:
        path.unlink(missing_ok=True)


def _timed_write_read(path: Path, size: int) -> Dict[str, Any]:
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // BLOCK):
            os.write(fd, block)
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
        if hasattr(os, "posix_fadvise"):  # drop it from the page cache, so the read comes from storage
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    t3 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    t4 = time.perf_counter()
    return {"bytes": size, "write_s": t1 - t0, "fsync_s": t2 - t1, "read_s": t4 - t3,
            "write_mbs": size / (t2 - t0) / 2**20, "read_mbs": size / (t4 - t3) / 2**20}  # fmt: skip


def measure(run: RunConfig, rank: int, size: int) -> Dict[str, Any]:
    """This rank's figures for both directories (errors as strings)."""
    out: Dict[str, Any] = {}
    for key, where in (("train.output_dir", run.train.output_dir), ("data.output", run.data.output)):
        # Each rank's probe file sits in the directory itself: no shared scratch directory that one rank
        # could remove while another is about to write into it (seen under load in CI).
        if not storage.is_local(where):  # object storage: the training check streams from it
            out[key] = {"remote": True, "path": where}
            continue
        directory = Path(where).absolute()
        try:
            out[key] = _probe(directory, rank, size)
        except OSError as err:
            out[key] = {"error": f"{type(err).__name__}: {err}"}
        out[key]["free"] = free_bytes(Path(where).absolute())
        out[key]["path"] = str(Path(where).absolute())
    return out


def check(run: RunConfig, per_rank: List[Dict[str, Any]]) -> List[Result]:
    results = []
    need = checkpoint_room(run)
    for key in ("train.output_dir", "data.output"):
        rows = [r[key] for r in per_rank]
        path = rows[0]["path"]
        if rows[0].get("remote"):
            results.append(Result(f"storage/{key}", SKIPPED, "object storage", f"{key}={path}: not probed as a "
                                  "directory; the training check reads its shards", {"ranks": rows}))  # fmt: skip
            continue
        errors = [f"rank {i}: {r['error']}" for i, r in enumerate(rows) if "error" in r]
        if errors:
            results.append(Result(f"storage/{key}", FAIL, "not writable", f"{key}={path} is not writable: "
                                  f"{'; '.join(errors[:4])} — fix its permissions or choose another directory",
                                  {"ranks": rows}))  # fmt: skip
            continue
        write = min(r["write_mbs"] for r in rows)
        read = min(r["read_mbs"] for r in rows)
        fsync = max(r["fsync_s"] for r in rows)
        free = min(r["free"] for r in rows)
        detail = (f"{path}: {len(rows)} rank(s) × {human_bytes(rows[0]['bytes'])} at once; slowest rank write+fsync "
                  f"{write:,.0f} MiB/s (fsync {fsync * 1000:.0f} ms), read {read:,.0f} MiB/s; free {human_bytes(free)}")  # fmt: skip
        if key == "train.output_dir":
            detail += f", checkpoints need about {human_bytes(need)} (train.keep_checkpoints + 1 being written)"
            if free < need:
                results.append(Result(f"storage/{key}", FAIL, f"{human_bytes(free)} free", f"not enough room for "
                                      f"the checkpoints: {detail}", {"ranks": rows}))  # fmt: skip
                continue
        results.append(Result(f"storage/{key}", PASS, f"w {write:,.0f} / r {read:,.0f} MiB/s", detail, {"ranks": rows}))
    return results
