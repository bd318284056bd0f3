"""Disk space for checkpoints: whether they fit, and what to say when not (sizes: ``runs.disk``).

Quotas (EDQUOT on Lustre/NFS/GPFS) are invisible to free-space
checks: only a failing write shows them, and the checkpointer handles that too.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

from scale_hyper.runs.disk import estimate_checkpoint_bytes, free_bytes, human_bytes

__all__ = ["estimate_checkpoint_bytes", "free_bytes", "human", "looks_like_no_space", "preflight_message"]

human = human_bytes  # the checkpointer's messages


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
