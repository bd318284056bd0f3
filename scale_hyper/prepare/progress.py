"""A small progress reporter: a redrawn line on a terminal, plain periodic lines in logs, silent off rank 0."""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Optional


def is_rank0() -> bool:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


class Progress:
    def __init__(
        self, label: str, stream: Optional[IO[str]] = None, enabled: Optional[bool] = None, log_every_s: float = 10.0
    ):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = is_rank0() if enabled is None else enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # a terminal is redrawn often; a log file gets a line every log_every_s seconds
        self.every = 0.2 if self.tty else log_every_s
        self.start = self.last = time.monotonic()
        self.docs = self.tokens = 0

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        dt = max(time.monotonic() - self.start, 1e-9)
        msg = (
            f"{self.label}: {self.docs:,} documents, {self.tokens:,} tokens "
            f"({self.tokens / dt / 1e3:,.0f}k tokens/s, {dt:.0f}s)"
        )
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._emit(final=True)
