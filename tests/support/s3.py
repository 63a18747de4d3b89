"""A real S3-compatible HTTP server (moto's server mode) in its own process, for the tests.

The server is started once per test session on a free loopback port and knows nothing
about the code under test; the code under test only gets its endpoint URL. Use it from a
conftest with ``from support.s3 import *`` and request the fixtures:

- ``s3_server``: the endpoint URL (``http://127.0.0.1:<port>``). While the session uses
  it, the environment carries dummy credentials (moto accepts any) and is isolated from
  the developer's own AWS settings (``~/.aws``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``).
- ``s3_client``: a boto3 client for that server, for arranging and inspecting buckets
  behind the back of the code under test.
- ``s3_bucket``: a fresh, empty bucket per test (deleted afterwards).

``S3_TEST_CREDENTIALS`` holds the dummy credentials, for subprocesses that need them.
"""

from __future__ import annotations

import atexit
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["S3_TEST_CREDENTIALS", "s3_bucket", "s3_client", "s3_server"]

S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "preftune-test",
    "AWS_SECRET_ACCESS_KEY": "preftune-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Settings from the developer's machine that would change how boto3 behaves in tests.
_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

_START_TIMEOUT_S = 60.0


class _MotoServer:
    """``python -m moto.server`` on 127.0.0.1, shared by every fixture instance of the session."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""
        self.users = 0
        self.lock = threading.Lock()
        self.log = Path(tempfile.mkdtemp(prefix="preftune-moto-")) / "moto.log"

    def acquire(self) -> str:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.users += 1
            return self.endpoint_url

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users <= 0:
                self.stop()

    def _start(self) -> None:
        # The port is chosen by binding to 0 and released before moto binds it; another
        # process could take it in between, so a lost race is retried on a new port.
        last_error = ""
        for _ in range(3):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            with open(self.log, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            if _wait_ready("127.0.0.1", port, proc):
                self.proc = proc
                self.endpoint_url = f"http://127.0.0.1:{port}"
                atexit.register(self.stop)
                return
            _stop_process(proc)
            last_error = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto server did not start (log {self.log}):\n{last_error}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


def _wait_ready(host: str, port: int, proc: subprocess.Popen[bytes]) -> bool:
    """True once the server answers HTTP; False if the process died or never answered."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    return False


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_SERVER = _MotoServer()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of the session's moto S3 server, with dummy credentials in the environment."""
    endpoint = _SERVER.acquire()
    empty_aws_dir = tmp_path_factory.mktemp("aws-config")
    (empty_aws_dir / "config").write_text("")
    (empty_aws_dir / "credentials").write_text("")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in _AWS_ENV_TO_CLEAR:
                mp.delenv(name, raising=False)
            for name, value in S3_TEST_CREDENTIALS.items():
                mp.setenv(name, value)
            mp.setenv("AWS_CONFIG_FILE", str(empty_aws_dir / "config"))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty_aws_dir / "credentials"))
            # No instance-metadata look-ups (they wait for a timeout off EC2).
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            yield endpoint
    finally:
        _SERVER.release()


@pytest.fixture(scope="session")
def s3_client(s3_server: str) -> Any:
    """A boto3 S3 client for the test server (arrange and inspect buckets directly)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=S3_TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
    )


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    """Name of a fresh empty bucket on the test server; emptied and deleted after the test."""
    name = f"preftune-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        paginator = s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", []) or []]
            if keys:
                s3_client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        s3_client.delete_bucket(Bucket=name)
