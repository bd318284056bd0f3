"""What a log step reports: the window's loss (mean over every micro-batch of every rank), lr,
throughput, MFU, memory — to MLflow and, for reading without MLflow, to RUN/metrics.jsonl (rank 0)."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from scale_hyper import runs
from scale_hyper.engine.progress import memory_mb
from scale_hyper.engine.state import TrainState


class Reporter:
    def __init__(self, run: Any, info: Any, engine: Any, tracker: Any, flops_per_token: float,
                 peak: Optional[float]) -> None:  # fmt: skip
        self.run, self.info, self.engine, self.tracker = run, info, engine, tracker
        self.flops_per_token, self.peak = flops_per_token, peak
        self.metrics_path = runs.RunDir(run.train.output_dir).metrics
        self._clock, self._tokens_at = time.perf_counter(), 0

    def start_window(self, state: TrainState) -> None:
        self._clock, self._tokens_at = time.perf_counter(), state.tokens_seen

    def record(self, metrics: Dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step=step)
        if self.info.is_main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_step(self, state: TrainState) -> Dict[str, float]:
        """Collective (one all-reduce of the loss window); called on every rank at log steps."""
        total = state.take_window(self.info.device)
        dist.all_reduce(total)
        loss_total, n = total.tolist()
        elapsed = time.perf_counter() - self._clock
        tokens_per_s = (state.tokens_seen - self._tokens_at) / max(elapsed, 1e-9)
        metrics = {
            "loss": loss_total / max(n, 1.0),
            "lr": float(self.engine.get_lr()[0]),
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / self.run.data.seq_len,
            "skipped_steps": float(state.skipped),
            "tokens_seen": float(state.tokens_seen),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.info.world_size)
        mem = memory_mb(self.info.device)
        if mem is not None:
            metrics["memory_mb"] = mem
        self.record(metrics, state.step)
        self.start_window(state)
        return metrics
