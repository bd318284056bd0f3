"""A full disk during ``scale-hyper prepare``: one line (exit 2) with ``data.output``, its free space and
what the slices still to do need, instead of a traceback from the worker pool.

Nothing half-written looks complete: files appear whole or not at all (``storage.open_write``: a
temporary name, removed on an error, then a rename), and a slice's partial manifest is written after
its shards; so the same command, with space, redoes the unfinished slices and writes the same bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

from scale_hyper.data import storage


class OutOfSpace(Exception):
    """ENOSPC/EDQUOT while a slice was written, with the bytes that slice needs (its rows are packed in
    memory before the first shard is written, so this is known); crosses the worker pool by pickling."""

    def __init__(self, slice_id: int, needed: int, reason: str):
        super().__init__(slice_id, needed, reason)
        self.slice_id, self.needed, self.reason = slice_id, needed, reason


def is_out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def remaining_need(data_cfg, plan: Dict[str, Any], todo: List[int], full: OutOfSpace) -> str:
    """What the slices of this task still to do need, from the slices written so far (their shards'
    bytes in their partial manifests) and the failed slice's own size."""
    from scale_hyper.prepare.slices import read_partial  # slices imports this module

    sizes, left = [full.needed], 0
    for slice_id in todo:
        partial = read_partial(data_cfg, slice_id)
        if partial and "splits" in partial:
            sizes.append(sum(s["bytes"] for split in partial["splits"].values() for s in split["shards"]))
        else:
            left += 1
    finished = len(todo) - left
    return (
        f"the {left} slice(s) of this task still to do need ~{_mb(sum(sizes) / len(sizes) * left)} "
        f"(measured on {len(sizes)} slice(s) written or tried); the {finished} finished ones are kept"
    )


def no_space(data_cfg, reason: str, need: str = "") -> Exception:
    from scale_hyper.prepare.slices import PrepareError  # slices imports this module

    out = data_cfg.output
    free = ""
    if storage.is_local(out):
        probe = storage.local_path(out)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        free = f"{_mb(shutil.disk_usage(probe).free)} free there; "
    return PrepareError(
        f"no space left in data.output={out} ({reason}): {free}{need or 'nothing is marked complete'} — "
        "free space or set data.output to a larger disk, then run the same command again: it resumes"
    )


@contextmanager
def full_disk_is_one_line(data_cfg) -> Iterator[None]:
    """ENOSPC/EDQUOT anywhere in prepare (tokenizer, plan, a slice, the manifest) -> PrepareError (exit 2)."""
    try:
        yield
    except OSError as err:
        if is_out_of_space(err):
            raise no_space(data_cfg, err.strerror or str(err)) from None
        raise
