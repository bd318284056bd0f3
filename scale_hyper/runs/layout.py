"""Paths of a run directory, and which checkpoints in it are complete.

A checkpoint is complete once its marker (``trainer_state.json``) exists: the marker is written
last, atomically, after every rank finished its part, so a directory without it is an interrupted
save and is never read.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from scale_hyper import __version__
from scale_hyper.config import RunConfig, load_saved

MARKER = "trainer_state.json"
SET_ASIDE = ".damaged"  # suffix of a damaged checkpoint a resume moved out of the way (kept, never read)
_STEP_DIR = re.compile(r"^step_(\d+)(_universal)?$")
_SET_ASIDE_DIR = re.compile(r"^step_(\d+)(_universal)?\.damaged(\d*)$")
PathLike = Union[str, "os.PathLike[str]"]


class NoCheckpointError(FileNotFoundError):
    """A path that holds no complete checkpoint; the message says what was looked for."""

    user_error = True


def step_name(step: int, universal: bool = False) -> str:
    return f"step_{step}" + ("_universal" if universal else "")


def is_universal(ckpt: Path) -> bool:
    return ckpt.name.endswith("_universal")


@dataclass(frozen=True)
class RunDir:
    """``train.output_dir``: every path inside it is named here and nowhere else."""

    path: Path

    def __init__(self, path: PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "hf"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def step(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def complete_checkpoints(self) -> List[Path]:
        return complete_checkpoints(self.checkpoints)

    def newest(self) -> Optional[Path]:
        found = self.complete_checkpoints()
        return found[-1] if found else None


def is_checkpoint(path: PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(save_dir: PathLike) -> List[Path]:
    """Complete checkpoints in DeepSpeed's save directory, oldest first (universal after plain)."""
    found = []
    for d in Path(save_dir).glob("step_*"):
        m = _STEP_DIR.match(d.name)
        if m and is_checkpoint(d):
            found.append((int(m.group(1)), bool(m.group(2)), d))
    return [d for _, _, d in sorted(found)]


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged`` (``.damaged2``, … when taken): kept for inspection,
    never resumed, never pruned, and out of the way of the next save of step N."""
    target, k = ckpt.with_name(ckpt.name + SET_ASIDE), 1
    while target.exists():
        k += 1
        target = ckpt.with_name(f"{ckpt.name}{SET_ASIDE}{k}")
    ckpt.rename(target)
    return target


def set_aside_checkpoints(save_dir: PathLike) -> List[Path]:
    """The damaged checkpoints resumes have set aside in DeepSpeed's save directory, oldest step first."""
    found = []
    for d in Path(save_dir).glob("step_*" + SET_ASIDE + "*"):
        m = _SET_ASIDE_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d.name, d))
    return [d for _, _, d in sorted(found)]


def find_checkpoint(path: PathLike) -> Path:
    """The checkpoint ``path`` means: itself, the newest in DeepSpeed's save directory, or the
    newest of a run directory. Raises NoCheckpointError naming what it looked for."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    for save_dir in (p, RunDir(p).checkpoints):
        found = complete_checkpoints(save_dir)
        if found:
            return found[-1]
    raise NoCheckpointError(
        f"{p} holds no finished checkpoint: neither a checkpoint (no {MARKER}), a checkpoints/ directory "
        f"nor a run output_dir with complete step_N/ in checkpoints/ — pass a run directory or one of its "
        "checkpoints/step_N"
    )


def read_state(ckpt: PathLike) -> Dict[str, Any]:
    with open(Path(ckpt) / MARKER) as f:
        return json.load(f)


def write_state(ckpt: PathLike, state: Dict[str, Any]) -> None:
    """Write the marker atomically: the checkpoint is complete from the rename on."""
    tmp = Path(ckpt) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, Path(ckpt) / MARKER)


def warn(message: str) -> None:
    """Readers run on one process, or on every rank (train.init_from): said by rank 0."""
    if os.environ.get("RANK", "0") == "0":
        print(f"scale-hyper: warning: {message}", file=sys.stderr, flush=True)


def run_config_of(ckpt: PathLike) -> RunConfig:
    """The resolved config a checkpoint was trained with (stored in its marker). Keys a newer
    scale-hyper saved that this one does not know are left out, said once per process."""
    state = read_state(ckpt)
    saved_by = f"scale-hyper {state['scale_hyper_version']}" if "scale_hyper_version" in state else "another version"
    run, ignored = load_saved(state["config_yaml"], f"checkpoint {ckpt}", saved_by)
    if ignored:
        line = (
            f"checkpoint {ckpt} was saved by {saved_by}: ignoring {', '.join(ignored)}, "
            f"which scale-hyper {__version__} does not know"
        )
        if line not in _said:  # a source is resolved several times
            _said.add(line)
            warn(line)
    return run


_said: set = set()
