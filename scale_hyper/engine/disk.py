"""Disk space for checkpoints: how much one takes, whether it fits, and what to say when not.

The size of a checkpoint is measured from the newest complete one when there is one, otherwise
estimated from the parameter count: fp32 master weights and two Adam moments (12 bytes/parameter,
sharded over the ranks under ZeRO-1/2/3, whole under ZeRO-0) plus the model weights in their
training dtype, with 10 % for metadata. Quotas (EDQUOT on Lustre/NFS/GPFS) are invisible to free-space
checks: only a failing write shows them, and the checkpointer handles that too.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_checkpoint_bytes(params: int, precision: str, newest: Optional[Path]) -> int:
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


def looks_like_no_space(err: BaseException, path: Path, needed: int) -> bool:
    """ENOSPC/EDQUOT, or torch's serializer's way of saying it ('iostream error', 'unexpected pos')
    when the disk is in fact (nearly) full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return free_bytes(path) < needed


def preflight_message(output_dir: Path, one_checkpoint: int, keep: int) -> Optional[str]:
    """A warning when train.output_dir cannot hold keep + 1 checkpoints (the new one is written
    before the oldest is pruned); None when it can."""
    copies = (keep if keep > 0 else 1) + 1
    needed, free = one_checkpoint * copies, free_bytes(output_dir)
    if free >= needed:
        return None
    return (
        f"WARNING: {output_dir} has {human(free)} free; {copies} checkpoints of ~{human(one_checkpoint)} "
        f"(train.keep_checkpoints={keep} + the one being written) need ~{human(needed)}. Saves will fail "
        "when the disk fills (the newest complete checkpoint stays usable); free space, lower "
        "train.keep_checkpoints or point train.output_dir elsewhere. Quotas are not visible here."
    )
