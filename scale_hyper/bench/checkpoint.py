"""`scale-hyper bench checkpoint [--size-mb N]`: what checkpoint manifests cost per GB.

Writes N MiB of fp32 tensors as 4 ``torch.save`` files (what one rank's shards look like) into a scratch
directory under ``train.output_dir`` (the filesystem the checkpoints would live on), the way the
checkpointer does: once plain, once with each file handed to ``manifest.Hasher`` as soon as it is
written (hashing overlaps with writing the next file). Then it times ``verify`` in ``sizes`` and
``full`` mode on those files, with the page cache warm (as right after a save, or when the checkpoint
fits in memory) — a cold read adds the storage's read time, which DeepSpeed's load then saves.
Figures are per GiB written; the save overhead is the wall time of the hashed write (until every hash
is known) minus the plain one (the best of 3 repeats of each). The CPU seconds of a full verify are
what a core spends hashing, which other work on a shared machine barely moves.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from scale_hyper import runs
from scale_hyper.runs import manifest

_FILES = 4


def _write(where: Path, size_mb: int, hasher: Optional[manifest.Hasher]) -> float:
    """Seconds to write the files (and, with a hasher, until every checksum is known)."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    per_file = torch.rand(size_mb * (1 << 20) // 4 // _FILES)
    start = time.perf_counter()
    for i in range(_FILES):
        path = where / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt"
        torch.save({"state": per_file}, path)
        if hasher is not None:
            hasher.add(path)
    if hasher is not None:
        hasher.entries()
    return time.perf_counter() - start


def measure(root: Path, size_mb: int, repeats: int = 3) -> Dict[str, float]:
    scratch = root / "bench-checkpoint-scratch"
    try:
        plain = min(_write(scratch / "step_1", size_mb, None) for _ in range(repeats))
        hashed = []
        for _ in range(repeats):
            hasher = manifest.Hasher(scratch / "step_1")
            hashed.append(_write(scratch / "step_1", size_mb, hasher))
            checksum = manifest.write(scratch / "step_1", [], 1, 1)
        runs.write_state(scratch / "step_1", manifest.seal({"step": 1, "world_size": 1}, checksum))
        timings, cpu = {}, {}
        for mode in ("sizes", "full"):
            best, best_cpu = float("inf"), float("inf")
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                verdict = manifest.verify(scratch / "step_1", mode)
                best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
                assert verdict.status == manifest.INTACT, verdict.problems
            timings[mode], cpu[mode] = best, best_cpu
        gib = size_mb / 1024
        return {
            "size_mib": size_mb,
            "write_s_per_gib": plain / gib,
            "write_and_hash_s_per_gib": min(hashed) / gib,
            "save_overhead_s_per_gib": (min(hashed) - plain) / gib,
            "verify_sizes_s": timings["sizes"],
            "verify_full_s_per_gib": timings["full"] / gib,
            "verify_full_cpu_s_per_gib": cpu["full"] / gib,
            "hash_gib_per_s": gib / timings["full"],
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(run, size_mb: int = 1024) -> int:
    root = Path(run.train.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint manifests: {size_mb} MiB in {_FILES} files under {root} ({os.cpu_count()} CPUs), best of 3")
    r = measure(root, size_mb)
    print(f"write (torch.save)             {r['write_s_per_gib']:.2f} s/GiB")
    print(f"write + xxh3_64 of each file   {r['write_and_hash_s_per_gib']:.2f} s/GiB "
          f"(save overhead {r['save_overhead_s_per_gib']:+.2f} s/GiB)")  # fmt: skip
    print(f"verify sizes                   {r['verify_sizes_s'] * 1000:.1f} ms for {_FILES} files")
    print(f"verify full (warm page cache)  {r['verify_full_s_per_gib']:.2f} s/GiB = {r['hash_gib_per_s']:.1f} GiB/s "
          f"({r['verify_full_cpu_s_per_gib']:.2f} CPU-s/GiB)")  # fmt: skip
    return 0
