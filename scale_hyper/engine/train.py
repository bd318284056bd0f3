"""`scale-hyper train`: the training loop and the setup it needs.

The loop (`train`) fits on one screen; everything else is a component: distributed setup, the
DeepSpeed config, hypernetwork residency, checkpoints, tracking, logging.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from scale_hyper.config import ConfigError, RunConfig
from scale_hyper.engine import checkpoint
from scale_hyper.engine.context import Context, to_device
from scale_hyper.engine.distributed import DistInfo, init_distributed
from scale_hyper.engine.progress import Progress, log


class StopRequested:
    """SIGUSR1/SIGTERM (SLURM's --signal, preemption) → checkpoint at the next step and exit 0."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def check_run(run: RunConfig) -> None:
    t = run.train
    if t.activation_checkpointing == "reentrant":
        raise ConfigError(
            "train.activation_checkpointing=reentrant is not supported: reentrant checkpointing re-runs the "
            "forward inside autograd, so the hypernetwork shared by all layers has its gradients reduced more "
            "than once per step under ZeRO-2/3 ('already been reduced'). Use train.activation_checkpointing=non_reentrant."
        )
    if t.activation_checkpointing not in ("none", "non_reentrant"):
        raise ConfigError(f"train.activation_checkpointing={t.activation_checkpointing!r} is not one of none, non_reentrant")
    if t.max_steps <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be positive")


def train(run: RunConfig, ctx: Context, stop: StopRequested) -> Dict[str, Any]:
    """The loop. Returns where it ended, and why if a signal stopped it."""
    t, engine, info = run.train, ctx.engine, ctx.info
    it = iter(ctx.loader)
    step, bad_in_row, tokens_since, clock = ctx.start_step, 0, 0, time.perf_counter()
    progress = Progress(total=t.max_steps, initial=step, enabled=info.is_main)
    while step < t.max_steps:
        batch = to_device(next(it), info.device)
        loss = engine(**batch, sparse_logits=True).loss
        if not ctx.all_finite(loss):  # skip the micro-batch on every rank; stop after too many in a row
            ctx.skipped, bad_in_row = ctx.skipped + 1, bad_in_row + 1
            if bad_in_row >= t.max_bad_steps:
                ctx.save(step)
                raise FloatingPointError(f"{bad_in_row} non-finite losses in a row at step {step}; checkpoint saved")
            continue
        engine.backward(loss)
        engine.step()
        bad_in_row, tokens_since = 0, tokens_since + batch["input_ids"].numel()
        ctx.loss_sum, ctx.loss_n = ctx.loss_sum + loss.item(), ctx.loss_n + 1
        if engine.global_steps == step:  # inside gradient accumulation: no optimizer step yet
            continue
        step = engine.global_steps
        if step % t.log_every == 0 or step == t.max_steps:
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            metrics = ctx.step_metrics(tokens_since * info.world_size / elapsed)
            tokens_since = 0
            ctx.record(metrics, step)
            progress.update(step, metrics)
        if step % t.eval_every == 0 and step < t.max_steps:
            ctx.record(ctx.evaluate(), step)
        sliced = t.stop_after_steps and step - ctx.start_step >= t.stop_after_steps and step < t.max_steps
        if stop.agreed(info.device) or sliced:
            ctx.save(step)
            progress.close()
            reason = signal.Signals(stop.signum).name if stop.signum else "train.stop_after_steps"
            return {"stopped_by": reason, "step": step}
        if step % t.save_every == 0 and step < t.max_steps:
            ctx.save(step)
    progress.close()
    return {"step": step}


def main(run: RunConfig) -> int:
    """Entry point of the `train` verb: setup, loop, final save/eval/export, summary."""
    check_run(run)
    stop = StopRequested()  # before setup: a preemption during data preparation is honoured too
    info: Optional[DistInfo] = None
    ctx: Optional[Context] = None
    try:
        info = init_distributed(run.train.device, run.train.dist_timeout_minutes)
        ctx = Context.build(run, info)
        result = train(run, ctx, stop)
        if "stopped_by" in result:
            log(info, f"stopped by {result['stopped_by']}: checkpoint saved at step {result['step']}; "
                "exiting so the job can be requeued (train.resume=auto continues from it)")
            ctx.tracker.finish("KILLED")
            return 0
        summary = ctx.finish(result["step"])
        if info.is_main:
            print(summary, flush=True)
        return 0
    except (ConfigError, checkpoint.ResumeError, FileNotFoundError, ValueError) as err:
        print(f"scale-hyper: error: {err}", file=sys.stderr, flush=True)
        if ctx:
            ctx.tracker.finish("FAILED")
        return 2
    except FloatingPointError as err:
        print(f"scale-hyper: stopped: {err}", file=sys.stderr, flush=True)
        if ctx:
            ctx.tracker.finish("FAILED")
        return 3
    except (RuntimeError, dist.DistBackendError) as err:
        if info is None or info.world_size == 1 or not _looks_distributed(err):
            raise
        newest = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(run.train.output_dir))
        print(
            f"scale-hyper: rank {info.rank}: a collective with the other ranks failed or timed out "
            f"(train.dist_timeout_minutes={run.train.dist_timeout_minutes}): another rank probably died or hung"
            f"{_suspect(ctx, info)}. Newest checkpoint: {newest[-1] if newest else 'none'}; "
            f"resume with train.resume=auto. Cause: {str(err).splitlines()[0][:300]}",
            file=sys.stderr,
            flush=True,
        )
        return 4


def _looks_distributed(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "closed")
    )


def _suspect(ctx: Optional[Context], info: DistInfo) -> str:
    silent = ctx.silent_ranks() if ctx else []
    return f" (no heartbeat from rank {', '.join(map(str, silent))})" if silent else ""
