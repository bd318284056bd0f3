"""Disk space of a run directory: sizes, free space, and how to print them.

Shared by the checkpointer (the save-time checks) and the doctor (its storage check). The size of a
checkpoint is measured from the newest complete one when there is one, otherwise estimated from the
parameter count: fp32 master weights and two Adam moments (12 bytes/parameter) plus the model
weights in their training dtype, with 10 % for metadata.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_checkpoint_bytes(params: int, precision: str, newest: Optional[Path] = None) -> int:
    """Bytes of one checkpoint (all ranks' files together)."""
    if newest is not None and newest.is_dir():
        return int(directory_bytes(newest) * 1.05)
    weight_bytes = 2 if precision in ("bf16", "fp16") else 4
    return int(params * (12 + weight_bytes) * 1.1) + (1 << 20)


def free_bytes(path: Path) -> int:
    """Free space of the filesystem holding ``path`` (its nearest existing parent)."""
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
