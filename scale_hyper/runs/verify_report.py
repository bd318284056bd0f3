"""`scale-hyper checkpoint verify PATH|RUN_DIR`: every checkpoint of a run against its manifest, one line
each. Imports neither torch nor DeepSpeed (only the files and their manifests are read)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List

from scale_hyper.runs.disk import human_bytes
from scale_hyper.runs.layout import (
    SET_ASIDE,
    PathLike,
    RunDir,
    complete_checkpoints,
    find_checkpoint,
    is_checkpoint,
    set_aside_checkpoints,
)
from scale_hyper.runs.manifest import DAMAGED, INTACT, UNVERIFIABLE, verify


def _listed(path: Path) -> List[Path]:
    """What ``checkpoint verify PATH`` checks: a checkpoint, or every one of a run or save directory
    (those set aside by a resume included), oldest step first."""
    if is_checkpoint(path):
        return [path]
    for save_dir in (path, RunDir(path).checkpoints):
        found = complete_checkpoints(save_dir) + set_aside_checkpoints(save_dir)
        if found:
            return sorted(found, key=lambda d: (int(d.name.split("_")[1].split(".")[0]), d.name))
    find_checkpoint(path)  # raises NoCheckpointError naming what was looked for
    return []


def main(path: PathLike, mode: str = "full", out: Callable[[str], None] = print) -> int:
    """`scale-hyper checkpoint verify PATH|RUN_DIR`: one line per checkpoint (a damaged one: one more line
    per further problem); 1 when a checkpoint a resume would consider is damaged, else 0."""
    verdicts = [verify(c, mode) for c in _listed(Path(path))]
    checked = "sizes and checksums match" if mode == "full" else "sizes match (checksums not read: --sizes-only)"
    labels = [v.status + (" (set aside)" if SET_ASIDE in v.ckpt.name else "") for v in verdicts]
    width, label_width = max(len(str(v.ckpt)) for v in verdicts), max(map(len, labels))
    for v, label in zip(verdicts, labels, strict=True):
        detail = {
            INTACT: f"{v.files} files, {human_bytes(v.bytes)}: {checked}",
            UNVERIFIABLE: "saved before checkpoint manifests existed: it still loads, unverified",
        }.get(v.status, v.problems[0] if v.problems else "")
        out(f"{str(v.ckpt):<{width}}  {label:<{label_width}}  {detail}")
        for problem in v.problems[1:] if v.status == DAMAGED else []:
            out(f"{'':<{width}}  {'':<{label_width}}  {problem}")
    live = [v for v in verdicts if SET_ASIDE not in v.ckpt.name]
    counts = {s: sum(v.status == s for v in verdicts) for s in (INTACT, DAMAGED, UNVERIFIABLE)}
    newest = next((v.ckpt for v in reversed(live) if v.usable), None)
    out(f"{len(verdicts)} checkpoint(s): {counts[INTACT]} intact, {counts[DAMAGED]} damaged, "
        f"{counts[UNVERIFIABLE]} unverifiable; newest loadable: {newest or 'none'}")  # fmt: skip
    return 1 if any(v.status == DAMAGED for v in live) else 0
