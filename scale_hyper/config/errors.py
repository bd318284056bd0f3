"""User errors: one line ``scale-hyper: error: <what> — <fix>``, exit code 2, no traceback.

An exception class is a user error when it carries ``user_error = True`` (ConfigError, the resume,
checkpoint, storage and data errors). Everything else is an internal error and keeps its traceback.
``SCALE_HYPER_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys


def is_user_error(err: BaseException) -> bool:
    return bool(getattr(type(err), "user_error", False))


def one_line(err: BaseException) -> str:
    """The message as one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its text; its last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def report(err: BaseException) -> int:
    """Print a user error the one way (or re-raise it under SCALE_HYPER_DEBUG=1); returns 2."""
    if os.environ.get("SCALE_HYPER_DEBUG") == "1":
        raise err
    print(f"scale-hyper: error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2
