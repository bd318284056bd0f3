"""Rank-0 progress: a live bar on a terminal, plain log lines otherwise (SLURM logs)."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional


def log(info, message: str) -> None:
    if info is None or info.is_main:
        print(f"[scale-hyper] {message}", flush=True)


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.start_step, self.enabled = total, initial, enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
        fields = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}", "eta": _eta(eta)}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(fields, refresh=True)
        else:
            extra = " | ".join(f"{k} {v}" for k, v in fields.items())
            print(f"[scale-hyper] step {step}/{self.total} | {extra} | lr {metrics['lr']:.2e}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def memory_mb(device) -> Optional[float]:
    """Peak accelerator memory, or this process's resident memory on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return None
