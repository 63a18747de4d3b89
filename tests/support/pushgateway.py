"""A real Prometheus Pushgateway (Debian's prometheus-pushgateway) on a free loopback port,
started once per test session: fixture ``pushgateway`` (its URL). Fails under CI when the
binary is missing (``.ci/run`` installs it), skips elsewhere."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

__all__ = ["pushgateway"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus-pushgateway is not installed (apt-get install -y prometheus-pushgateway)")
        pytest.skip("prometheus-pushgateway is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("the Pushgateway did not become ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
