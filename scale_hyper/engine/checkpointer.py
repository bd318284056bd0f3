"""Checkpoints: DeepSpeed's sharded state plus the TrainState, written crash-safely.

Every rank writes its DeepSpeed shards and ``rank_R.pt`` (RNG states), hashing each file right after
it is written; after a barrier rank 0 writes the manifest (every file's size and checksum,
``scale_hyper.runs.manifest``) and then the marker (``trainer_state.json``: TrainState, world size,
every rank's data cursor, MLflow run id, the resolved config, the manifest's checksum) atomically,
then prunes older checkpoints. The directory layout is ``scale_hyper.runs``'; a directory without the
marker is an interrupted save and is never read. Which checkpoint a run resumes from, and whether it
verifies, is ``engine/resume.py``'s.

Resuming at another world size needs DeepSpeed's universal format:
``scale-hyper checkpoint universal CKPT`` writes ``step_N_universal/`` beside it, and
``train.resume=auto`` picks it when the world size differs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from scale_hyper import __version__, runs
from scale_hyper.config import RunConfig, to_yaml
from scale_hyper.engine import disk
from scale_hyper.engine.progress import log
from scale_hyper.engine.resume import ResumeError
from scale_hyper.engine.state import TrainState
from scale_hyper.runs import manifest


class OtherRankFailed(RuntimeError):
    """This rank's part of a save went fine, another rank's did not."""


class StorageError(RuntimeError):
    """A checkpoint that could not be written (full disk, quota, I/O error, permissions)."""

    user_error = True


class Checkpointer:
    """Saves and restores one run's checkpoints (collective: every rank calls every method)."""

    def __init__(self, run: RunConfig, engine: Any, loader: Any, info: Any, tracker: Any) -> None:
        self.run, self.engine, self.loader, self.info, self.tracker = run, engine, loader, info, tracker
        self.run_dir = runs.RunDir(run.train.output_dir)
        self.last_saved = -1
        self.written: Dict[str, Dict[str, Any]] = {}  # this rank's files of the current save: size, checksum
        self.params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
        self.precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"

    def checkpoint_bytes(self) -> int:
        return disk.estimate_checkpoint_bytes(self.params, self.precision, self.run_dir.newest())

    def preflight(self) -> None:
        """Warn (rank 0) when train.output_dir cannot hold keep + 1 checkpoints."""
        if self.info.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            warning = disk.preflight_message(
                self.run_dir.path, self.checkpoint_bytes(), self.run.train.keep_checkpoints
            )
            if warning:
                log(self.info, warning)

    def _agree(self, failed: bool) -> bool:
        """Collective: True on every rank when any rank failed."""
        flag = torch.tensor([1.0 if failed else 0.0], device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _write(self, ckpt: Path) -> Optional[BaseException]:
        """This rank's part of a save; the error it met, if any. Every rank leaves it having passed the
        same collectives, failed or not, so no rank waits for one that gave up."""
        rank = self.info.rank
        error: Optional[BaseException] = None
        try:
            if rank == 0:
                if ckpt.exists():  # a leftover interrupted save of this step
                    shutil.rmtree(ckpt)
                ckpt.mkdir(parents=True)
            free_ok = disk.free_bytes(self.run_dir.checkpoints) >= self.checkpoint_bytes() or _skip_space_check()
            if not free_ok:
                error = OSError(errno.ENOSPC, "not enough free space for the checkpoint")
        except OSError as err:
            error = err
        if self._agree(error is not None):  # nothing written yet: all ranks stop here together
            return error or OtherRankFailed("another rank could not start the save")
        hasher = manifest.Hasher(ckpt)
        try:
            _inject_save_failure(self.engine, rank)
            with _hashing_writes(self.engine, hasher):
                self.engine.save_checkpoint(str(self.run_dir.checkpoints), tag=ckpt.name)
        except (OSError, RuntimeError) as err:
            error = err
            dist.barrier()  # the one DeepSpeed's save ends with, which the other ranks are waiting in
        if error is None:
            try:
                torch.save(_rng_state(), ckpt / f"rank_{rank}.pt")
                hasher.add(ckpt / f"rank_{rank}.pt")
                self.written = hasher.entries()
            except (OSError, RuntimeError) as err:
                error = err
        else:
            hasher.close()
        if self._agree(error is not None):
            return error or OtherRankFailed("another rank's part of the save failed")
        return None

    def _fail(self, ckpt: Path, error: BaseException) -> StorageError:
        if self.info.is_main:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()
        needed, free = self.checkpoint_bytes(), disk.free_bytes(self.run_dir.checkpoints)
        cause = "no space left" if disk.looks_like_no_space(error, self.run_dir.checkpoints, needed) else "write failed"
        who = (
            str(error)
            if isinstance(error, OtherRankFailed)
            else f"rank {self.info.rank}: {' '.join(str(error).split())[:200]}"
        )
        newest = self.run_dir.newest()
        return StorageError(
            f"could not write checkpoint {ckpt}: {cause} ({who}); it needs ~{disk.human(needed)}, "
            f"{disk.human(free)} is free there; "
            f"the partial directory was removed, the newest complete checkpoint is {newest or 'none'} — free space "
            f"(or raise the quota) under {self.run_dir.checkpoints}, or lower train.keep_checkpoints, or set "
            f"train.output_dir to a larger filesystem; then rerun: train.resume=auto continues from the newest"
        )

    def save(self, state: TrainState) -> Path:
        cursors: List[Any] = [None] * self.info.world_size
        dist.all_gather_object(cursors, self.loader.state_dict())
        ckpt, rank = self.run_dir.step(state.step), self.info.rank
        error = self._write(ckpt)
        if error is not None:
            raise self._fail(ckpt, error)
        _pause_before_marker(rank, state.step)
        written: List[Any] = [None] * self.info.world_size
        dist.all_gather_object(written, self.written)  # also the barrier: every rank's files are complete
        if rank == 0:
            checksum = manifest.write(ckpt, written, state.step, self.info.world_size)
            runs.write_state(ckpt, manifest.seal({
                **state.to_dict(),
                "world_size": self.info.world_size,
                "data_cursors": cursors,
                "mlflow_run_id": self.tracker.run_id,
                "config_yaml": to_yaml(self.run),
                "scale_hyper_version": __version__,  # named when another version reads this checkpoint
                "data_output": self.run.data.output,
            }, checksum))  # fmt: skip
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
        for old in manifest.prunable(plain, keep):  # spares the newest intact one while newer ones are damaged
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _hashing_writes(engine: Any, hasher: manifest.Hasher) -> Iterator[None]:
    """Each file DeepSpeed's checkpoint engine writes is handed to ``hasher`` as soon as ``save`` returns
    (with the default torch engine the file is then closed), so hashing it overlaps with writing the
    next. Other engines may still be writing when ``save`` returns: their files are hashed by rank 0
    with the manifest instead."""
    writer: Any = getattr(engine, "checkpoint_engine", None)
    if type(writer).__name__ != "TorchCheckpointEngine":
        yield
        return
    save = writer.save

    def save_and_hash(state_dict: Any, path: str) -> None:
        save(state_dict, path)
        hasher.add(path)

    writer.save = save_and_hash
    try:
        yield
    finally:
        del writer.save  # the class's method again


# --- test hooks (environment variables; unset in real runs) -----------------------------------------


def _skip_space_check() -> bool:
    """SCALE_HYPER_TEST_SKIP_SPACE_CHECK=1: go ahead and let the disk fill mid-save (fault tests)."""
    return os.environ.get("SCALE_HYPER_TEST_SKIP_SPACE_CHECK") == "1"


def _inject_save_failure(engine: Any, rank: int) -> None:
    """SCALE_HYPER_TEST_SAVE_FAILS_ON_RANK=R: rank R's own write inside DeepSpeed's save (its ZeRO
    shard, after DeepSpeed's opening barrier) fails with ENOSPC, as when one node's disk fills."""
    if os.environ.get("SCALE_HYPER_TEST_SAVE_FAILS_ON_RANK") != str(rank):
        return

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected by SCALE_HYPER_TEST_SAVE_FAILS_ON_RANK)")

    engine._save_zero_checkpoint = fail


def _pause_before_marker(rank: int, step: int) -> None:
    """A deterministic kill point for fault tests. SCALE_HYPER_TEST_PAUSE_IN_SAVE=STEP (and optionally
    SCALE_HYPER_TEST_PAUSE_RANKS=0,1): once this rank's files of step STEP are written and before the
    marker, write PAUSED_rankR into SCALE_HYPER_TEST_PAUSE_DIR and wait until CONTINUE appears there."""
    ranks = os.environ.get("SCALE_HYPER_TEST_PAUSE_RANKS", str(rank)).split(",")
    if os.environ.get("SCALE_HYPER_TEST_PAUSE_IN_SAVE") != str(step) or str(rank) not in ranks:
        return
    import time

    where = Path(os.environ.get("SCALE_HYPER_TEST_PAUSE_DIR", "."))
    (where / f"PAUSED_rank{rank}").write_text(str(os.getpid()))
    while not (where / "CONTINUE").exists():
        time.sleep(0.2)


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
    checksum = manifest.write(out, [], int(state["step"]), int(state["world_size"]))  # one process wrote all
    runs.write_state(out, manifest.seal(state, checksum))
    return out


def main(action: str, checkpoint: str, out: Optional[str]) -> int:
    """`scale-hyper checkpoint universal CKPT [--out DIR]` (CKPT verified first: a damaged one is refused)."""
    if action != "universal":
        raise ValueError(action)
    try:
        result = to_universal(manifest.find_intact(checkpoint), Path(out) if out else None)
    except (ResumeError, runs.NoCheckpointError, manifest.DamagedCheckpointError) as err:
        print(f"scale-hyper: error: {err}", file=sys.stderr)
        return 2
    print(f"universal checkpoint written to {result}; resume with train.resume=auto (or train.resume={result})")
    return 0
