"""Checkpoints: DeepSpeed's sharded state plus the TrainState, written crash-safely.

Every rank writes its DeepSpeed shards and ``rank_R.pt`` (RNG states); after a barrier rank 0 writes
the marker (``trainer_state.json``: TrainState, world size, every rank's data cursor, MLflow run id,
the resolved config) atomically, then prunes older checkpoints. The directory layout is
``scale_hyper.runs``'; a directory without the marker is an interrupted save and is never read.

Resuming at another world size needs DeepSpeed's universal format:
``scale-hyper checkpoint universal CKPT`` writes ``step_N_universal/`` beside it, and
``train.resume=auto`` picks it when the world size differs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from scale_hyper import runs
from scale_hyper.config import RunConfig, to_yaml
from scale_hyper.engine.progress import log
from scale_hyper.engine.state import TrainState


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message names the fix."""


def resolve_resume(resume: str, output_dir: str, world_size: int) -> Optional[Path]:
    """Which checkpoint ``train.resume`` means for this world size (None: start fresh)."""
    if resume == "none":
        return None
    if resume == "auto":
        candidates = runs.RunDir(output_dir).complete_checkpoints()
        if not candidates:
            return None
        newest_step = runs.read_state(candidates[-1])["step"]
        at_newest = [c for c in candidates if runs.read_state(c)["step"] == newest_step]
        same_world = [c for c in at_newest if not runs.is_universal(c)]
        if same_world and runs.read_state(same_world[0])["world_size"] == world_size:
            return same_world[0]
        universal = [c for c in at_newest if runs.is_universal(c)]
        return universal[0] if universal else at_newest[0]
    path = Path(resume)
    if path.is_dir() and not runs.is_checkpoint(path):  # a run's output_dir
        return resolve_resume("auto", str(path), world_size)
    if not runs.is_checkpoint(path):
        raise ResumeError(f"train.resume={resume}: no finished checkpoint there (no {runs.MARKER})")
    return path


def check_world_size(ckpt: Path, world_size: int) -> Dict[str, Any]:
    state = runs.read_state(ckpt)
    if state["world_size"] != world_size and not state.get("universal"):
        raise ResumeError(
            f"checkpoint {ckpt} was saved by {state['world_size']} ranks but this run has {world_size} — "
            f"DeepSpeed's sharded state only loads at the same world size; convert it first with "
            f"`scale-hyper checkpoint universal {ckpt}`, then resume again (train.resume=auto picks the universal copy)"
        )
    return state


class Checkpointer:
    """Saves and restores one run's checkpoints (collective: every rank calls every method)."""

    def __init__(self, run: RunConfig, engine: Any, loader: Any, info: Any, tracker: Any) -> None:
        self.run, self.engine, self.loader, self.info, self.tracker = run, engine, loader, info, tracker
        self.run_dir = runs.RunDir(run.train.output_dir)
        self.last_saved = -1

    def save(self, state: TrainState) -> Path:
        cursors: List[Any] = [None] * self.info.world_size
        dist.all_gather_object(cursors, self.loader.state_dict())
        ckpt, rank = self.run_dir.step(state.step), self.info.rank
        if rank == 0 and ckpt.exists():  # a leftover interrupted save of this step
            shutil.rmtree(ckpt)
        dist.barrier()
        self.engine.save_checkpoint(str(self.run_dir.checkpoints), tag=ckpt.name)
        torch.save(_rng_state(), ckpt / f"rank_{rank}.pt")
        dist.barrier()
        if rank == 0:
            runs.write_state(ckpt, {
                **state.to_dict(),
                "world_size": self.info.world_size,
                "data_cursors": cursors,
                "mlflow_run_id": self.tracker.run_id,
                "config_yaml": to_yaml(self.run),
                "data_output": self.run.data.output,
            })  # fmt: skip
            self._prune()
        dist.barrier()
        self.last_saved = state.step
        log(self.info, f"checkpoint saved: {ckpt}")
        return ckpt

    def save_unless_saved(self, state: TrainState) -> Path:
        return self.run_dir.step(state.step) if self.last_saved == state.step else self.save(state)

    def restore(self, ckpt: Path) -> Dict[str, Any]:
        """Model, optimizer, scheduler and this rank's RNG; returns the saved trainer state."""
        saved = runs.read_state(ckpt)
        load_path, _ = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load {ckpt}")
        rng_file = ckpt / f"rank_{self.info.rank}.pt"
        if rng_file.is_file() and not saved.get("universal"):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        self.last_saved = int(saved["step"])
        return saved

    def _prune(self) -> None:
        keep = self.run.train.keep_checkpoints
        if keep <= 0:
            return
        plain = [c for c in self.run_dir.complete_checkpoints() if not runs.is_universal(c)]
        for old in plain[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> Dict[str, Any]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(saved: Dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def to_universal(ckpt: Path, out: Optional[Path] = None) -> Path:
    """Run DeepSpeed's ds_to_universal and carry our trainer state across."""
    ckpt = Path(ckpt)
    if not runs.is_checkpoint(ckpt):
        raise ResumeError(f"{ckpt} is not a finished scale-hyper checkpoint (no {runs.MARKER})")
    out = Path(out) if out else ckpt.with_name(ckpt.name + "_universal")
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt), "--output_folder", str(out),
        "--inject_missing_state",  # ZeRO-1/2 checkpoints lack parameter-shape metadata it needs
        "--num_extract_workers", "2", "--num_merge_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ResumeError(f"ds_to_universal failed for {ckpt}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    state = runs.read_state(ckpt)
    state.update(universal=True, source=str(ckpt))
    runs.write_state(out, state)
    return out


def main(action: str, checkpoint: str, out: Optional[str]) -> int:
    """`scale-hyper checkpoint universal CKPT [--out DIR]`."""
    if action != "universal":
        raise ValueError(action)
    try:
        result = to_universal(runs.find_checkpoint(checkpoint), Path(out) if out else None)
    except (ResumeError, runs.NoCheckpointError) as err:
        print(f"scale-hyper: error: {err}", file=sys.stderr)
        return 2
    print(f"universal checkpoint written to {result}; resume with train.resume=auto (or train.resume={result})")
    return 0
