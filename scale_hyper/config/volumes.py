"""Outputs on volumes, inside the container image.

The images set ``SCALE_HYPER_REQUIRE_VOLUME=1`` (docker/Dockerfile*). There, a verb that writes checks
its output paths before anything is written: a path on the container's own filesystem (no volume
mounted there) would vanish with the container, and a volume the container's user cannot write fails
only later, mid-run. Both are one ``scale-hyper: error: <what> — <fix>`` line and exit 2. Outside the
images (the variable unset or 0) nothing is checked.
"""

from __future__ import annotations

import os
import re
from typing import List, Tuple

from scale_hyper.config.model import fail
from scale_hyper.config.schema import RunConfig

ENV = "SCALE_HYPER_REQUIRE_VOLUME"


def _mount_points(mountinfo: str = "/proc/self/mountinfo") -> List[str]:
    """Every mount point of this process's mount namespace (field 5 of mountinfo, octal escapes undone)."""
    points = []
    with open(mountinfo) as fh:
        for line in fh:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
    return points


def _mount_of(path: str, points: List[str]) -> str:
    """The mount point holding ``path`` (an absolute, resolved path): the longest one it lies under."""
    best = "/"
    for p in points:
        if (path == p or path.startswith(p.rstrip("/") + "/")) and len(p) > len(best):
            best = p
    return best


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (what will be written into, or created under)."""
    path = os.path.realpath(os.path.abspath(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _local(target: str) -> bool:
    return "://" not in target or target.startswith("file://")


def outputs(run: RunConfig, verb: str) -> List[Tuple[str, str]]:
    """(config key, local path) of what ``verb`` will write."""
    out: List[Tuple[str, str]] = []
    data = run.data.output
    if _local(data) and not run.data.mixture:
        path = data[len("file://") :] if data.startswith("file://") else data
        if not os.path.exists(os.path.join(path, "manifest.json")):  # not prepared yet: it will be written
            out.append(("data.output", path))
    if verb in ("train", "doctor"):
        out.append(("train.output_dir", run.train.output_dir))
    uri = run.tracking.uri
    if verb == "train" and run.tracking.enabled and uri.startswith("sqlite:///"):
        out.append(("tracking.uri", os.path.dirname(uri[len("sqlite:///") :]) or "."))
    return out


def check(run: RunConfig, verb: str) -> None:
    """Raise ConfigError when an output of ``verb`` is not on a writable volume (inside the images only)."""
    if os.environ.get(ENV, "0") != "1":
        return
    points = _mount_points()
    for key, target in outputs(run, verb):
        where = _existing(target)
        mount = _mount_of(where, points)
        shown = os.path.abspath(target)
        if mount == "/":
            raise fail(
                f"{key}={target} ({shown}) is not on a mounted volume: it would be written into the container and "
                "lost with it",
                f'mount a writable host directory there (e.g. podman/docker run -v "$PWD/work:{os.getcwd()}" '
                f"...), or point {key} at a mounted volume; {ENV}=0 allows it",
            )
        if not os.access(where, os.W_OK):
            uid, gid = os.getuid(), os.getgid()
            raise fail(
                f"{key}={target}: the volume at {mount} is not writable by this container's user (uid {uid}, "
                f"gid {gid}; {where} is owned by uid {os.stat(where).st_uid})",
                f"make the host directory writable for uid {uid} (chown {uid}:{gid} DIR) or run the container "
                'as its owner (--user "$(id -u):$(id -g)")',
            )
