"""`scale-hyper train`: the loop, and the run around it (setup, the finish, how it ends).

The loop (``train``) reads top to bottom; each call in it is one component's job (``setup``).

Exit codes (``main``): 0 finished, or stopped by SIGUSR1/SIGTERM/train.stop_after_steps with a
checkpoint; 2 bad input (one line); 3 too many non-finite steps in a row (checkpoint saved); 4 a
collective failed or timed out (a rank died, or is alive but stuck); 5 a rank sent no heartbeat for
train.dist_timeout_minutes (stopped, hung, node gone) — every live rank names it (``heartbeat.py``).
On a plain step — one that neither logs, evaluates, saves nor checks for a stop signal — it makes
no device→host sync and no collective of its own (``docs/benchmarks.md`` has the count).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Optional

import torch.distributed as dist

from scale_hyper import runs
from scale_hyper.config import ConfigError, RunConfig, errors
from scale_hyper.engine import setup, sync_audit
from scale_hyper.engine.checkpointer import StorageError
from scale_hyper.engine.distributed import DistInfo, init_distributed
from scale_hyper.engine.evaluator import to_device
from scale_hyper.engine.export import dump_masters_if_requested
from scale_hyper.engine.heartbeat import Heartbeats
from scale_hyper.engine.progress import Progress, log
from scale_hyper.engine.resume import ResumeError
from scale_hyper.engine.watchdog import NonFiniteError, StopSignals, count_update, injected_nonfinite_steps
from scale_hyper.runs import manifest


def train(tr: setup.Trainer, stop: StopSignals) -> Optional[str]:
    """Optimizer steps until train.max_steps; returns what stopped it early (None: it finished)."""
    t, info, engine, state = tr.run.train, tr.info, tr.engine, tr.state
    batches, started_at, poison = iter(tr.loader), state.step, injected_nonfinite_steps()
    progress = Progress(total=t.max_steps, initial=state.step, enabled=info.is_main)
    tr.reporter.start_window(state)
    while state.step < t.max_steps:
        for _ in range(engine.gradient_accumulation_steps()):  # one optimizer step
            with sync_audit.strict(info.device, state.step):  # SCALE_HYPER_SYNC_DEBUG: syncs here raise
                batch = to_device(next(batches), info.device)
                loss = engine(**batch, sparse_logits=True).loss
            if state.step + 1 in poison and info.rank == 0:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()  # applies the update at the accumulation boundary, unless its gradients are non-finite
            with sync_audit.strict(info.device, state.step):
                state.add_loss(loss)
            state.tokens_seen += batch["input_ids"].numel() * info.world_size
        state.step += 1
        count_update(engine, state)
        if state.bad_in_row >= t.max_bad_steps:
            tr.checkpointer.save(state)
            raise NonFiniteError(f"{state.bad_in_row} optimizer steps in a row had non-finite gradients "
                                 f"(step {state.step}); checkpoint saved")  # fmt: skip
        last = state.step == t.max_steps
        if state.step % t.log_every == 0 or last:
            progress.update(state.step, tr.reporter.log_step(state))
        if state.step % t.eval_every == 0 and not last:
            tr.reporter.record(tr.evaluator.evaluate(), state.step)
        sliced = bool(t.stop_after_steps) and state.step - started_at >= t.stop_after_steps and not last
        if sliced or (state.step % t.stop_check_every == 0 and stop.agreed(info.device)):
            tr.checkpointer.save(state)
            progress.close()
            return stop.name
        if state.step % t.save_every == 0 and not last:
            tr.checkpointer.save(state)
    progress.close()
    return None


def finish(tr: setup.Trainer, started: float) -> str:
    """The end of a complete run: final checkpoint, validation, HF export, summary."""
    state, info = tr.state, tr.info
    ckpt = tr.checkpointer.save_unless_saved(state)
    dump_masters_if_requested(tr.engine, info.rank)  # tests only
    after = tr.evaluator.evaluate()
    tr.reporter.record(after, state.step)
    export_dir = runs.RunDir(tr.run.train.output_dir).export if tr.run.train.export else None
    if export_dir is not None:
        dist.barrier()
        if info.is_main:
            from scale_hyper.engine.export import export_checkpoint

            export_checkpoint(ckpt, export_dir)
        dist.barrier()
    tr.tracker.finish("FINISHED")
    before = state.val_before or {}
    lines = [
        "",
        "=== scale-hyper: training finished ===",
        f"steps           {state.step} (skipped non-finite: {state.skipped}), {time.perf_counter() - started:.0f} s",
        f"val MLM loss    {before.get('val_loss', float('nan')):.4f} -> {after['val_loss']:.4f} "
        f"(accuracy {before.get('val_accuracy', float('nan')):.3f} -> {after['val_accuracy']:.3f})",
        f"checkpoint      {ckpt}",
        f"export (HF)     {export_dir or 'disabled (train.export=false)'}",
        f"MLflow run      {tr.tracker.run_id or 'tracking disabled'}  ({getattr(tr.tracker, 'display_uri', '')})",
        f"MLflow UI       {tr.tracker.ui_hint}" if tr.tracker.run_id else "",
    ]
    return "\n".join(lines)


def main(run: RunConfig) -> int:
    """Entry point of the `train` verb: how each way of ending maps to an exit code."""
    started, stop = time.perf_counter(), StopSignals()  # before setup: a preemption during data prep counts too
    info: Optional[DistInfo] = None
    tr: Optional[setup.Trainer] = None
    beats: Optional[Heartbeats] = None
    sync_audit.install_if_requested()  # tests and benchmarks only: counts syncs per step
    try:
        info = init_distributed(run.train.device, run.train.dist_timeout_minutes)
        run_dir = runs.RunDir(run.train.output_dir)
        beats = Heartbeats(
            info.rank,
            info.world_size,
            run.train.dist_timeout_minutes,
            partial(manifest.newest_sized, run_dir.checkpoints),
        ).start()  # a hang names the newest checkpoint whose file sizes match its manifest
        tr = setup.build(run, info)
        beats.follow(lambda: tr.state.step if tr else None)
        if tr.state.val_before is None:  # the baseline every later validation is compared with
            tr.state.val_before = tr.evaluator.evaluate()
            tr.reporter.record(tr.state.val_before, 0)
        stopped_by = train(tr, stop)
        if stopped_by:
            log(info, f"stopped by {stopped_by}: checkpoint saved at step {tr.state.step}; "
                "exiting so the job can be requeued (train.resume=auto continues from it)")  # fmt: skip
            tr.tracker.finish("KILLED")
            return 0
        summary = finish(tr, started)
        if info.is_main:
            print(summary, flush=True)
        return 0
    except (ConfigError, ResumeError, StorageError, FileNotFoundError, ValueError) as err:
        if tr:
            tr.tracker.finish("FAILED")
        return errors.report(err)
    except NonFiniteError as err:
        print(f"scale-hyper: stopped: {err}", file=sys.stderr, flush=True)
        if tr:
            tr.tracker.finish("FAILED")
        return 3
    except (RuntimeError, dist.DistBackendError) as err:
        if info is None or info.world_size == 1 or not _looks_distributed(err):
            raise
        newest = manifest.newest_sized(runs.RunDir(run.train.output_dir).checkpoints)
        silent = beats.dead_ranks() if beats else []
        suspect = f" (no heartbeat from rank {', '.join(map(str, silent))})" if silent else ""
        print(
            f"scale-hyper: rank {info.rank}: a collective with the other ranks failed or timed out (collectives "
            f"wait {beats.t.collective_s if beats else 0:.0f} s with train.dist_timeout_minutes={run.train.dist_timeout_minutes:g}):"
            " another rank died, or is alive but stuck"
            f"{suspect}. Newest checkpoint: {newest or 'none'}; resume with train.resume=auto. "
            f"Cause: {str(err).splitlines()[0][:300]}",
            file=sys.stderr,
            flush=True,
        )
        return 4
    finally:
        if beats:
            beats.stop()  # this rank leaves: nobody names it while the others finish


def _looks_distributed(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "closed")
    )
