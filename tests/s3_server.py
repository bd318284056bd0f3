"""A real S3-compatible server for the tests: moto's server mode (``moto[server]``), started once per
test session on a free localhost port with one bucket, and a TCP proxy that can drop connections
mid-response (a real fault on a real socket, between a real client and the server).

Fixtures (registered in conftest.py): ``s3_server`` (session) and ``s3`` (per test: the AWS_*
variables set for this process, and a key prefix of its own). Outside CI a server that cannot start
skips the tests that need it, with the reason; under ``CI=true`` it fails them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

BUCKET = "scale-hyper-test"


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str = BUCKET
    prefix: str = ""  # per test (see the ``s3`` fixture)

    def env(self, endpoint: Optional[str] = None) -> Dict[str, str]:
        """What a client process needs: dummy credentials, this endpoint, no host AWS config."""
        missing = os.path.join(os.sep, "nonexistent", "aws")
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint or self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": missing,
            "AWS_SHARED_CREDENTIALS_FILE": missing,
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p for p in (self.prefix, *parts) if p]])

    def keys(self, *parts: str) -> List[str]:
        """Every key under ``url(*parts)``, relative to it (read with a plain boto3 client)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
        base = self.url(*parts)[len(f"s3://{self.bucket}/") :].rstrip("/") + "/"
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        return sorted(o["Key"][len(base) :] for page in pages for o in page.get("Contents", []))


def _unavailable(reason: str):
    from conftest import unavailable  # here, not at the top: conftest imports this module

    unavailable(reason)


@pytest.fixture(scope="session")
def s3_server():
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        _unavailable(f"the S3 test server needs moto[server] and boto3 (pip install -e '.[test]'): {err}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in failure reports
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
        s3 = S3Server(endpoint=f"http://{host}:{port}")
        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any failure to start is reported the same way
        server.stop()
        _unavailable(f"moto's S3 server did not start on 127.0.0.1: {type(err).__name__}: {err}")
    yield s3
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The session's server with this test's own key prefix; AWS_* set in this process for the test."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return S3Server(endpoint=s3_server.endpoint, prefix=re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name))


# --- faults --------------------------------------------------------------------------------------


@dataclass
class DropRule:
    match: bytes  # a GET whose request line contains this (e.g. b".tar ")
    after: int  # response bytes (headers included) let through before the connection is dropped
    times: Optional[int]  # how many matching GETs to drop; None = every one
    dropped: List[str] = field(default_factory=list)  # request lines of the dropped GETs


class DroppingProxy:
    """A localhost TCP proxy to ``upstream``; ``drop(...)`` makes it cut matching GETs mid-response.

    The cut is a real one: the proxy forwards ``after`` bytes of the response, then closes both
    sockets, so the client sees a body shorter than its Content-Length."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.rule: Optional[DropRule] = None
        self.gets: List[str] = []  # request lines of every GET that matched the rule's pattern or not
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, match: bytes, after: int, times: Optional[int]) -> DropRule:
        with self.lock:
            self.rule = DropRule(match, after, times)
            return self.rule

    def heal(self) -> None:
        with self.lock:
            self.rule = None

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        budget: List[Optional[int]] = [None]  # response bytes left before the cut (None: no cut armed)

        def requests() -> None:  # client → server; arms the cut before the request is forwarded
            try:
                while data := client.recv(65536):
                    line = data.split(b"\r\n", 1)[0]
                    if line.startswith(b"GET "):
                        with self.lock:
                            self.gets.append(line.decode(errors="replace"))
                            rule = self.rule
                            if rule and rule.match in line and (rule.times is None or len(rule.dropped) < rule.times):
                                rule.dropped.append(line.decode(errors="replace"))
                                budget[0] = rule.after
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                _close(upstream)

        threading.Thread(target=requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                left = budget[0]
                if left is not None and len(data) >= left:
                    client.sendall(data[:left])
                    break  # the cut: both sockets close below
                if left is not None:
                    budget[0] = left - len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
