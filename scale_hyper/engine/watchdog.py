"""The watchdog: stop signals and the non-finite-update guard (hung ranks: ``heartbeat.py``).

None of it costs the hot path a device sync or a collective on a plain step:
- signals set a flag; ranks agree on it (one all-reduce) only every ``train.stop_check_every`` steps;
- the guard reads DeepSpeed's own verdict on the step (``engine.was_step_applied()``, a host bool its
  overflow check computes anyway); only ZeRO-0 in fp32, where DeepSpeed has no check, gets ours.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from scale_hyper.engine import sync_audit


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had non-finite gradients."""


class StopSignals:
    """SIGUSR1/SIGTERM (SLURM's --signal, preemption) → checkpoint and exit 0."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "train.stop_after_steps"

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank once any rank got a signal (ranks must stop at one step);
        every rank then reports the signal that was received."""
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
        if received:
            self.signum = received
        return bool(received)


def guard_plain_optimizer(optimizer: Any) -> None:
    """Give a plain torch optimizer (ZeRO-0, fp32) the contract DeepSpeed's ZeRO and bf16 optimizers
    have: a step whose gradients are not all finite is refused and ``optimizer.overflow`` says so,
    so DeepSpeed skips the LR schedule for it and counts it. The gradients are already all-reduced
    (identical on every rank) when ``step`` runs, so the ranks agree without a collective; the check
    costs one host sync per optimizer step, as DeepSpeed's own overflow checks do."""
    inner = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return inner(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step


def count_update(engine: Any, state: Any) -> None:
    """After an optimizer step: DeepSpeed's verdict on it (a host bool, no sync of ours)."""
    if engine.was_step_applied():
        state.bad_in_row = 0
    else:
        state.skipped, state.bad_in_row = state.skipped + 1, state.bad_in_row + 1
    sync_audit.mark_step(state.step)
    if _SLOW_STEP_S:
        time.sleep(_SLOW_STEP_S)


# Test hook: SCALE_HYPER_TEST_STEP_SECONDS=0.3 makes every optimizer step take that much longer, so a
# fault test can signal a run in the middle of its steps.
_SLOW_STEP_S = float(os.environ.get("SCALE_HYPER_TEST_STEP_SECONDS") or 0)


def injected_nonfinite_steps() -> frozenset:
    """Test hook: SCALE_HYPER_TEST_NONFINITE_STEPS=3,4 makes rank 0's loss NaN in those optimizer
    steps (1-based), to prove the guard refuses them on every rank."""
    raw = os.environ.get("SCALE_HYPER_TEST_NONFINITE_STEPS", "")
    return frozenset(int(s) for s in raw.split(",") if s.strip())
