"""What a benchmark row runs on: device and precision choice, synchronisation, peak memory, names."""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from scale_hyper.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def pick_device(choice: str) -> torch.device:
    """train.device (auto | cpu | cuda) -> the one device a benchmark runs on."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda", 0) if choice in ("cuda", "auto") and torch.cuda.is_available() else torch.device("cpu")


def pick_precision(choice: str, device: torch.device) -> str:
    """deepspeed.precision for a benchmark: fp32 on CPU; on CUDA auto = bf16 where supported."""
    if choice != "auto" and choice not in PRECISIONS:
        raise ConfigError(f"deepspeed.precision={choice!r} is not one of auto, {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return "fp32"
    if choice == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return choice


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


class PeakMemory:
    """Peak memory growth during a row: CUDA allocator peak, or the process' peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    def peak(self) -> Optional[int]:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        try:
            return max(0, self._status("VmHWM") - self.base)
        except OSError:
            return None
