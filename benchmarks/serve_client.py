"""A lean HTTP/1.1 client for the load benchmark: one keep-alive connection per simulated rater.

The benchmark's client shares the machine's cores with the service and PostgreSQL, so every
CPU millisecond it spends per request is taken from the service. httpx's AsyncClient cost
about 5 ms of CPU per judgement (profiled: the client was the busiest process); this client
writes the request bytes itself, reads the answer with ``asyncio`` streams (uvloop when
installed) and decodes JSON with orjson when installed. It still reads every answer in full,
so the benchmark checks every acknowledgement as before.

Only what the benchmark needs: ``Content-Length`` bodies (the API never streams; a chunked
answer is an error), keep-alive, reconnect after a broken connection. Any network or protocol
failure raises :class:`NetworkError` and closes the connection; the next request reconnects.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

try:  # both are dependencies of preftune's service; fall back so the script runs anywhere
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
except ImportError:  # pragma: no cover
    orjson = None

    def _dumps(value: Any) -> bytes:
        return json.dumps(value).encode()

    _loads = json.loads


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: cheaper than wait_for (no extra task)


# IncompleteReadError is an EOFError; asyncio.TimeoutError is TimeoutError from 3.11 on.
_FAILURES = (OSError, EOFError, asyncio.LimitOverrunError, asyncio.TimeoutError, TimeoutError, ValueError)


class NetworkError(Exception):
    """The request may or may not have reached the service (connection broken, timeout, bad answer)."""


class Response:
    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes):
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return _loads(self.content)


class Connection:
    """One keep-alive connection to ``host:port`` (what one rater's browser tab holds)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path, None, headers)

    async def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Response:  # noqa: A002
        return await self.request("POST", path, _dumps(json) if json is not None else b"", headers)

    async def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> Response:
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(self._exchange(method, path, body, headers), self.timeout)
            async with _timeout(self.timeout):
                return await self._exchange(method, path, body, headers)
        except _FAILURES as err:
            self.close()
            raise NetworkError(f"{type(err).__name__}: {err}") from None

    async def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        if body is not None:
            head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body:
            head.append(body)
        self._writer.write(b"".join(head))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError("chunked answer: the benchmark client reads Content-Length bodies only")
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        content = await self._reader.readexactly(length) if length else b""
        if close:
            self.close()
        return Response(status, content)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def event_loop_runner():  # noqa: ANN201
    """``uvloop.run`` when uvloop is installed (the service runs on it too), else ``asyncio.run``."""
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run
