"""Where prepared data lives: a local directory or a URL, for reading and writing.

``data.output`` is either a local directory (``data/stdlib``, ``file:///abs/dir``) or a URL base:
``s3://bucket/dir`` (through s3fs: ranged GETs with retries, multipart uploads, the AWS SDK's
endpoint and credential variables; see ``s3``), or anything webdataset's ``gopen`` opens: ``gs://``
(gsutil), ``http(s)://`` (curl, read only) or a ``pipe:`` command. A ``pipe:`` base must contain
``{name}``, replaced by the file name, e.g. ``pipe:curl -s https://host/data/{name}`` for reading or
``pipe:aws s3 cp - s3://b/d/{name}`` for writing with a client of your own.

Safety: every URL is the user's own ``data.output`` joined with a file name that this package
generated and that matches ``SAFE_NAME`` (letters, digits, ``._-``), so nothing read from a shard
or a manifest can reach a shell. ``pipe:`` runs a shell command and is refused unless the same
config sets ``data.allow_pipe=true``.

A file appears only once it is complete: local files through a temporary name and a rename, s3
objects at the end of their upload (aborted on an error).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from contextlib import contextmanager
from typing import IO, Iterator, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

from scale_hyper.data import s3
from scale_hyper.data.s3 import RemoteStorageError  # noqa: F401  (re-exported: callers catch it from here)

# One optional directory level ("tokenizer/tokenizer.json"); no "..", no scheme, no spaces.
log = logging.getLogger("scale_hyper.data")

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_local(base: str) -> bool:
    scheme = urlparse(base).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")  # C:\ on Windows


def local_path(base: str) -> str:
    """The filesystem path of a local ``data.output`` (absolute, so workers and cwd changes agree)."""
    if base.startswith("file:"):
        base = url2pathname(urlparse(base).path)
    return os.path.abspath(os.path.expanduser(base))


def check_pipe(base: str, allow_pipe: bool) -> None:
    if base.startswith("pipe:") and not allow_pipe:
        raise ValueError(
            f"data.output={base!r} is a pipe: URL, which runs a shell command; "
            "set data.allow_pipe=true in your own config to allow it"
        )


def join(base: str, name: str) -> str:
    """The URL (or local path) of file ``name`` under ``data.output``."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise ValueError(f"refusing unsafe file name {name!r} (expected letters, digits, '._-')")
    if "{name}" in base:
        return base.replace("{name}", name)
    if base.startswith("pipe:"):
        raise ValueError(
            f"data.output={base!r}: a pipe: output needs a {{name}} placeholder, "
            "e.g. 'pipe:curl -s https://host/dir/{name}'"
        )
    if is_local(base):
        return os.path.join(local_path(base), *name.split("/"))
    return base.rstrip("/") + "/" + name


def _gopen(url: str, mode: str):
    wds_gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    return wds_gopen.gopen(url, mode)


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def open_read(url: str, allow_pipe: bool) -> IO[bytes]:
    """Open for reading. s3:// failures after retries raise ``RemoteStorageError`` naming the URL."""
    check_pipe(url, allow_pipe)
    if is_local(url):
        return open(local_path(url), "rb")
    if is_s3(url):
        return s3.open_read(url)  # type: ignore[return-value]
    return _gopen(url, "rb")


@contextmanager
def open_write(url: str, allow_pipe: bool) -> Iterator[IO[bytes]]:
    """Write a file; local files appear atomically (temp file + rename), so a crash leaves no half file."""
    check_pipe(url, allow_pipe)
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        f = open(tmp, "wb")
        try:
            yield f
            f.close()
            os.replace(tmp, path)
        except BaseException:
            try:
                f.close()  # flushes the buffer: raises again on a full disk, so the removal is in finally
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise
    elif is_s3(url):
        with s3.open_write(url) as w:
            yield w  # type: ignore[misc]
    else:
        f = _gopen(url, "wb")
        try:
            yield f
        finally:
            f.close()  # a Pipe raises here when the command failed


def read_bytes(url: str, allow_pipe: bool) -> bytes:
    with open_read(url, allow_pipe) as f:
        return f.read()


def read_optional(url: str, allow_pipe: bool) -> Optional[bytes]:
    """The file's bytes, or None when it does not exist (http/gs/pipe: when it cannot be read)."""
    if is_local(url):
        if not os.path.exists(local_path(url)):
            return None
        return read_bytes(url, allow_pipe)
    if is_s3(url):  # a missing key is None; a missing bucket or an unreachable store raises
        return s3.read_optional(url)
    try:
        data = read_bytes(url, allow_pipe)
    except OSError as err:  # curl/gsutil/cat report a missing object as a failed command
        log.warning("treating %s as absent: %s", url, err)
        return None
    return data or None


def write_bytes(url: str, data: bytes, allow_pipe: bool) -> None:
    with open_write(url, allow_pipe) as f:
        f.write(data)


class HashingWriter:
    """A write-only stream that passes bytes through and records their count and sha256."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()
