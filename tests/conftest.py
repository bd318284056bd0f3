"""Test-wide settings and helpers, applied before any test module imports transformers.

* Never touch the Hub (HF_HUB_OFFLINE).
* ``unavailable(reason)``: the one way a test gives up because something it needs is missing here
  (root, SLURM, triton, matplotlib, shellcheck, …). Locally that is a skip; under ``CI=true`` (which
  `.ci/run` exports) it is a failure, so a missing component can never silently drop a test in CI.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true: ``reason`` says what is missing and how to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI=true this test must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, hint: str = "pip install -e '.[test]'"):
    """``pytest.importorskip`` that fails under CI=true."""
    try:
        return __import__(name)
    except ImportError as err:
        unavailable(f"{name} is not importable ({err}) — {hint}")


# One S3-compatible server per session for the tests that take the `s3_server`/`s3` fixtures (tests/s3_server.py).
from s3_server import s3, s3_server  # noqa: E402, F401
