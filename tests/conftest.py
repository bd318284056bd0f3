"""Test-wide setting, applied before any test module imports transformers: never touch the Hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One S3-compatible server per session for the tests that take the `s3_server`/`s3` fixtures (tests/s3_server.py).
from s3_server import s3, s3_server  # noqa: E402, F401
