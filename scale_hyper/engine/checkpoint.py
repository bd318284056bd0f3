"""Checkpoints: DeepSpeed's sharded state plus our trainer state, written crash-safely.

Layout: `{output_dir}/checkpoints/step_N/` holds DeepSpeed's files, one `rank_R.pt` per rank (RNG
states) and, written LAST by rank 0 after every rank finished, `trainer_state.json` (step, world
size, every rank's data cursor, MLflow run id). A directory without that marker is an interrupted
save and is never resumed from, so a crash mid-save leaves the previous checkpoint the newest good
one. Older checkpoints are pruned only after the new marker exists.

Resuming at another world size needs DeepSpeed's universal format:
`scale-hyper checkpoint universal CKPT` writes `step_N_universal/` beside it; `train.resume=auto`
then picks it up when the world size differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

MARKER = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)(_universal)?$")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message names the fix."""


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def read_state(ckpt: Path) -> Dict[str, Any]:
    with open(ckpt / MARKER) as f:
        return json.load(f)


def complete_checkpoints(root: Path) -> List[Path]:
    """Checkpoints whose save finished, oldest first (universal after plain at the same step)."""
    found = []
    for d in root.glob("step_*"):
        m = _STEP_DIR.match(d.name)
        if m and (d / MARKER).is_file():
            found.append((int(m.group(1)), bool(m.group(2)), d))
    return [d for _, _, d in sorted(found)]


def resolve_resume(resume: str, output_dir: str, world_size: int) -> Optional[Path]:
    """Which checkpoint `train.resume` means for this world size (None: start fresh)."""
    if resume == "none":
        return None
    if resume == "auto":
        candidates = complete_checkpoints(checkpoint_root(output_dir))
        if not candidates:
            return None
        newest_step = read_state(candidates[-1])["step"]
        at_newest = [c for c in candidates if read_state(c)["step"] == newest_step]
        same_world = [c for c in at_newest if not c.name.endswith("_universal")]
        if same_world and read_state(same_world[0])["world_size"] == world_size:
            return same_world[0]
        universal = [c for c in at_newest if c.name.endswith("_universal")]
        return universal[0] if universal else at_newest[0]
    path = Path(resume)
    if path.is_dir() and not (path / MARKER).is_file():  # a run's output_dir
        return resolve_resume("auto", str(path), world_size)
    if not (path / MARKER).is_file():
        raise ResumeError(f"train.resume={resume}: no finished checkpoint there (no {MARKER})")
    return path


def check_world_size(ckpt: Path, world_size: int) -> Dict[str, Any]:
    state = read_state(ckpt)
    if state["world_size"] != world_size and not state.get("universal"):
        raise ResumeError(
            f"checkpoint {ckpt} was saved by {state['world_size']} ranks but this run has {world_size}. "
            f"DeepSpeed's sharded state only loads at the same world size. Convert it first:\n"
            f"    scale-hyper checkpoint universal {ckpt}\n"
            f"then resume again (train.resume=auto picks the universal copy)."
        )
    return state


def save(engine, output_dir: str, step: int, rank: int, state: Dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. `state` must already hold every rank's data cursor."""
    import torch.distributed as dist

    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    ckpt = root / tag
    if rank == 0 and ckpt.exists():  # a leftover interrupted save of this step
        shutil.rmtree(ckpt)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag)
    torch.save(_rng_state(), ckpt / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        tmp = ckpt / (MARKER + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, ckpt / MARKER)  # atomic: the checkpoint is complete from here on
        _prune(root, keep)
    dist.barrier()
    return ckpt


def load(engine, ckpt: Path, rank: int) -> Dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns trainer state."""
    state = read_state(ckpt)
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {ckpt}")
    rng_file = ckpt / f"rank_{rank}.pt"
    if rng_file.is_file() and not state.get("universal"):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _rng_state() -> Dict[str, Any]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(saved: Dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    plain = [c for c in complete_checkpoints(root) if not c.name.endswith("_universal")]
    for old in plain[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def to_universal(ckpt: Path, out: Optional[Path] = None) -> Path:
    """Run DeepSpeed's ds_to_universal and carry our trainer state across."""
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).is_file():
        raise ResumeError(f"{ckpt} is not a finished scale-hyper checkpoint (no {MARKER})")
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
    state = read_state(ckpt)
    state.update(universal=True, source=str(ckpt))
    (out / MARKER).write_text(json.dumps(state, indent=1, sort_keys=True))
    return out


def main(action: str, checkpoint: str, out: Optional[str]) -> int:
    """`scale-hyper checkpoint universal CKPT [--out DIR]`."""
    if action != "universal":
        raise ValueError(action)
    try:
        result = to_universal(Path(checkpoint), Path(out) if out else None)
    except ResumeError as err:
        print(f"scale-hyper: {err}", file=sys.stderr)
        return 1
    print(f"universal checkpoint written to {result}; resume with train.resume=auto (or train.resume={result})")
    return 0
