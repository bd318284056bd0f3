"""Which checkpoint ``train.resume`` continues from, whether it may, and what becomes of a damaged one.

``choose`` verifies candidates against their manifests (``scale_hyper.runs.manifest``) before DeepSpeed
touches them, newest first, on every rank together: each rank checks the sizes and the checksums of the
files it wrote, the verdicts are all-gathered, so every rank takes the same checkpoint. With
``train.resume=auto`` a damaged checkpoint is passed over for the newest one that verifies; an
explicit ``train.resume=PATH`` that does not verify is refused. ``announce`` (after the recipe checks,
so a refused resume changes nothing) logs one line per damaged checkpoint and sets it aside as
``step_N.damaged`` — kept for inspection, never deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from scale_hyper import runs
from scale_hyper.config import RunConfig
from scale_hyper.config.batch import global_batch as effective_global_batch
from scale_hyper.engine.progress import log
from scale_hyper.runs import manifest


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message names the fix."""

    user_error = True


@dataclass
class Choice:
    ckpt: Optional[Path]  # None: start fresh
    verdict: Optional[manifest.Verdict] = None  # of ckpt
    damaged: List[manifest.Verdict] = field(default_factory=list)  # passed over, newest first


def _world_of(ckpt: Path) -> Optional[int]:
    try:
        return int(runs.read_state(ckpt)["world_size"])
    except (OSError, ValueError, KeyError):
        return None  # an unreadable marker: verification says so


def candidates(output_dir: str, world_size: int) -> List[Path]:
    """Complete checkpoints in the order ``auto`` tries them: newest step first; at one step the plain
    checkpoint first when it was saved at this world size, else its universal copy first."""
    by_step: Dict[int, List[Path]] = {}
    for ckpt in runs.RunDir(output_dir).complete_checkpoints():
        by_step.setdefault(int(ckpt.name.split("_")[1]), []).append(ckpt)
    order = []
    for step in sorted(by_step, reverse=True):
        plain = [c for c in by_step[step] if not runs.is_universal(c)]
        universal = [c for c in by_step[step] if runs.is_universal(c)]
        same_world = bool(plain) and _world_of(plain[0]) == world_size
        order += plain + universal if same_world or not universal else universal + plain
    return order


def _verify(ckpt: Path, mode: str, info: Any) -> manifest.Verdict:
    if info is None or info.world_size == 1 or not dist.is_initialized():
        return manifest.verify(ckpt, mode)
    mine = manifest.verify(ckpt, mode, share=(info.rank, info.world_size))
    verdicts: List[Any] = [None] * info.world_size
    dist.all_gather_object(verdicts, mine)
    return manifest.merge(verdicts)


def _agreed(paths: List[Path], info: Any) -> List[Path]:
    """Rank 0's list on every rank (a node that sees the shared directory late cannot diverge)."""
    if info is None or info.world_size == 1 or not dist.is_initialized():
        return paths
    box = [paths]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def choose(resume: str, output_dir: str, world_size: int, mode: str = "full", info: Any = None) -> Choice:
    """The checkpoint ``train.resume`` means for this world size, verified (collective when ``info``
    names several ranks). Raises ResumeError for an explicit checkpoint that does not verify, or when
    every checkpoint of the run is damaged."""
    if resume == "none":
        return Choice(None)
    path = Path(resume)
    if resume != "auto" and not (path.is_dir() and not runs.is_checkpoint(path)):
        if not runs.is_checkpoint(path):
            raise ResumeError(f"train.resume={resume}: no finished checkpoint there (no {runs.MARKER})")
        verdict = _verify(path, mode, info)
        if not verdict.usable:
            raise ResumeError(
                f"train.resume={resume}: checkpoint {path} is damaged: {verdict.what()} — resume from an intact "
                f"one (train.resume=auto takes the newest that verifies; `scale-hyper checkpoint verify "
                f"{path.parent}` lists them), or set train.verify_checkpoint=off to load it unchecked"
            )
        return Choice(path, verdict)
    run_dir = output_dir if resume == "auto" else resume  # an explicit run directory means its newest
    damaged: List[manifest.Verdict] = []
    for ckpt in _agreed(candidates(run_dir, world_size), info):
        verdict = _verify(ckpt, mode, info)
        if verdict.usable:
            return Choice(ckpt, verdict, damaged)
        damaged.append(verdict)
    if damaged:
        raise ResumeError(
            f"every checkpoint in {runs.RunDir(run_dir).checkpoints} is damaged (the newest, {damaged[0].ckpt.name}: "
            f"{damaged[0].what()}) — restore them from a copy; or set train.verify_checkpoint=off to load the newest "
            "unchecked, or train.resume=none to start over"
        )
    return Choice(None)


def resolve_resume(resume: str, output_dir: str, world_size: int, mode: str = "full") -> Optional[Path]:
    """``choose`` on this process alone; the checkpoint only."""
    return choose(resume, output_dir, world_size, mode).ckpt


def announce(choice: Choice, info: Any) -> None:
    """Rank 0: one warning line per damaged checkpoint passed over, which is set aside (renamed, kept);
    one line for a checkpoint saved before manifests."""
    if not info.is_main:
        return
    for bad in choice.damaged:
        try:
            kept = f"the damaged directory is kept as {runs.set_aside(bad.ckpt).name}"
        except OSError as err:
            kept = f"it could not be renamed ({err.strerror}) and stays as it is"
        log(info, f"warning: checkpoint {bad.ckpt} is damaged: {bad.what()} — resuming from "
                  f"{choice.ckpt} instead; {kept}")  # fmt: skip
    if choice.verdict is not None and choice.verdict.status == manifest.UNVERIFIABLE:
        log(info, f"warning: {manifest.unverifiable_warning(choice.ckpt)}")  # type: ignore[arg-type]


def check_world_size(ckpt: Path, world_size: int) -> Dict[str, Any]:
    state = runs.read_state(ckpt)
    if state["world_size"] != world_size and not state.get("universal"):
        raise ResumeError(
            f"checkpoint {ckpt} was saved by {state['world_size']} ranks but this run has {world_size} — "
            f"DeepSpeed's sharded state only loads at the same world size; convert it first with "
            f"`scale-hyper checkpoint universal {ckpt}`, then resume again (train.resume=auto picks the universal copy)"
        )
    return state


def check_recipe(ckpt: Path, run: RunConfig, global_batch: int) -> None:
    """A resume continues the checkpoint's experiment: the global batch (sequences per optimizer step) and
    seq_len must be the checkpoint's; world size and micro batch may change. Raises before any work."""
    state = runs.read_state(ckpt)
    if "config_yaml" not in state:
        return
    saved = runs.run_config_of(ckpt)
    saved_global = effective_global_batch(
        saved.train.global_batch_size, saved.train.micro_batch_size, int(state["world_size"])
    )
    where = f"checkpoint {ckpt}"
    if saved_global != global_batch:
        raise ResumeError(
            f"{where} trained with train.global_batch_size={saved_global} sequences per step, this run has "
            f"{global_batch} — set train.global_batch_size={saved_global} to continue it (the micro batch and "
            f"world size may change), or start a new run (another train.output_dir, or train.resume=none)"
        )
    if saved.data.seq_len != run.data.seq_len:
        raise ResumeError(
            f"{where} trained with data.seq_len={saved.data.seq_len}, this run has {run.data.seq_len} — set "
            f"data.seq_len={saved.data.seq_len} to continue it, or start a new run (another train.output_dir, "
            f"or train.resume=none)"
        )
