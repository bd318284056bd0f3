"""``s3://`` URLs through s3fs: ranged GETs with retries for reading, multipart uploads for writing.

Why s3fs (fsspec) rather than the ``aws`` CLI in a pipe: a shard is read in ranged GETs of
``READ_BLOCK`` bytes, and a connection that drops mid-GET costs one retry of that block (s3fs
retries each request ``ATTEMPTS`` times with backoff; botocore adds its own retries for failed
connects), where an ``aws s3 cp`` pipe that broke mid-stream left an unreadable shard (skipped as
corrupt under ``data.on_corrupt=skip``). Errors come back as
types (missing key, missing bucket, no credentials, unreachable endpoint) instead of an exit status,
so a missing manifest is told apart from an unreachable store. And it avoids a second AWS SDK:
awscli pins one exact botocore, which conflicts with the botocore that s3fs's aiobotocore needs.

Endpoint and credentials follow the AWS SDK conventions (botocore reads them; nothing is configured
here): ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph,
SeaweedFS, moto), ``AWS_PROFILE`` and ``~/.aws/config``/``credentials``, ``AWS_ACCESS_KEY_ID`` +
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``.

A write appears only when it completes: a small object is one PUT at close, a large one a multipart
upload completed at close; on an exception the upload is aborted, so no half-written key exists.
"""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

READ_BLOCK = 16 << 20  # bytes per ranged GET (the readahead cache holds one block per open file)
WRITE_BLOCK = 16 << 20  # multipart part size (S3's minimum is 5 MiB)
ATTEMPTS = 5  # s3fs attempts per request (backoff 0.1 s × 1.7^i): a dropped connection is retried
BOTOCORE = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}

_FIX_ENDPOINT = "set AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) to the store's address, e.g. http://host:9000"
_FIX_CREDENTIALS = "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


class RemoteStorageError(ValueError):
    """The object store cannot be reached or refuses the request (after retries)."""

    user_error = True  # scale_hyper.config.errors: one line, exit 2


# One client per process (DataLoader workers forked from a rank make their own) and per endpoint
# setting (botocore reads the variables once, when the client is made).
_fs: Dict[Tuple[Any, ...], Any] = {}
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")


def filesystem():
    key = (os.getpid(), *(os.environ.get(k) for k in _ENV))
    fs = _fs.get(key)
    if fs is None:
        try:
            import s3fs
        except ImportError:
            raise RemoteStorageError(
                "s3:// URLs need s3fs, which is not installed — pip install 'scale-hyper[s3]' "
                "(or use a pipe: URL with your own client)"
            ) from None
        for name in ("botocore", "aiobotocore", "s3fs"):  # their INFO lines ("Found endpoint ...") are noise
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        fs = s3fs.S3FileSystem(config_kwargs=BOTOCORE, skip_instance_cache=True)
        fs.retries = ATTEMPTS
        _fs.clear()
        _fs[key] = fs
    return fs


def split(url: str) -> Tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key)."""
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default S3 endpoint"


def explain(action: str, url: str, err: BaseException) -> RemoteStorageError:
    """One line: what failed, where, why, and the fix (endpoint variables or credentials)."""
    name = type(err).__name__
    cause = " ".join(str(err).split())[:300]
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"):
        return RemoteStorageError(f"{action} {url}: no usable AWS credentials ({cause}) — {_FIX_CREDENTIALS}")
    if isinstance(err, PermissionError) or name in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return RemoteStorageError(
            f"{action} {url}: access denied by {endpoint()} ({cause}) — check the credentials "
            f"({_FIX_CREDENTIALS}) and the bucket's policy"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "InvalidEndpointURL"):
        return RemoteStorageError(
            f"{action} {url}: cannot reach the S3 endpoint {endpoint()} ({cause}) — {_FIX_ENDPOINT}, and check it is up"
        )
    return RemoteStorageError(
        f"{action} {url} failed after {ATTEMPTS} attempts at {endpoint()} ({name}: {cause}) — check the store and "
        f"the network ({_FIX_ENDPOINT}), then run again (training continues from its newest checkpoint)"
    )


def check_bucket(url: str) -> None:
    """Raise a RemoteStorageError naming the bucket when it does not exist or cannot be reached."""
    fs, (bucket, _) = filesystem(), split(url)
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise RemoteStorageError(
            f"bucket {bucket!r} of {url} does not exist at {endpoint()} — create it, fix the URL, or {_FIX_ENDPOINT}"
        ) from None
    except Exception as err:
        raise explain("checking", url, err) from None


class _Reader(io.RawIOBase):
    """A read-only, seekable stream over an s3fs file that reports failures as RemoteStorageError."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        try:
            self.f = filesystem().open(url, "rb", block_size=READ_BLOCK, cache_type="readahead")
        except FileNotFoundError:
            check_bucket(url)  # a missing bucket is the user's to fix; a missing key is the caller's
            raise
        except RemoteStorageError:
            raise
        except Exception as err:
            raise explain("opening", url, err) from None

    def read(self, size: Optional[int] = -1) -> bytes:
        try:
            return self.f.read(-1 if size is None else size)
        except Exception as err:
            raise explain("reading", self.url, err) from None

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # random access (a parquet footer, then one row group) in ranged GETs
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        if not self.closed and hasattr(self, "f"):  # not when __init__ failed
            self.f.close()
        super().close()


def open_read(url: str) -> _Reader:
    return _Reader(url)


class _Writer:
    def __init__(self, url: str, f: Any):
        self.url, self.f = url, f

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except Exception as err:
            raise explain("writing", self.url, err) from None

    def flush(self) -> None:
        pass  # parts are uploaded as they fill; close() completes the object


@contextmanager
def open_write(url: str) -> Iterator[_Writer]:
    """Write one object; it exists only if the block completes (an exception aborts the upload)."""
    try:
        f = filesystem().open(url, "wb", block_size=WRITE_BLOCK)
    except Exception as err:
        raise explain("writing", url, err) from None
    try:
        yield _Writer(url, f)
    except BaseException:
        try:
            f.discard()  # aborts a multipart upload; a single PUT has not been sent yet
        finally:
            f.closed = True  # so that close() (also from __del__) does not commit what was written
        raise
    try:
        f.close()
    except FileNotFoundError:
        check_bucket(url)
        raise
    except Exception as err:
        raise explain("writing", url, err) from None


def read_optional(url: str) -> Optional[bytes]:
    """The object's bytes, or None when the key does not exist in an existing bucket."""
    fs = filesystem()
    try:
        return fs.cat_file(url)
    except FileNotFoundError:
        check_bucket(url)
        return None
    except Exception as err:
        raise explain("reading", url, err) from None
