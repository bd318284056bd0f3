"""Leaving a process that ran distributed training, without the interpreter's teardown.

After a multi-rank run (train, doctor), Python's finalization destroys gloo's and the rendezvous store's C++
objects in no fixed order across ranks; a thread still inside one of them is then unwound through
C++ and aborts the process ("terminate called without an active exception", seen under srun after
the summary was printed). So the process entries (``scale-hyper``, ``python -m scale_hyper``, the
doctor's probe) run the atexit handlers (tracker, loader workers, logging), flush, and ``os._exit``.
Library calls (``scale_hyper.cli.main``) return normally.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

exit_code: int | None = None  # what leave_now exits with, for atexit handlers that record it (the probe)


def leave_now(code: int) -> NoReturn:
    global exit_code
    exit_code = code
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
