"""Fixtures and helpers for the feedback service tests (``tests/test_serve*.py``).

``serve_db`` is parametrised over SQLite (a file in the test's tmp dir) and the local
PostgreSQL (one fresh database per test module, migrated once, emptied before each test).
Import the fixtures into a test module by name: ``from support.serve import serve_db, ...``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from support.postgres import fresh_postgres_db

__all__ = [
    "ADMIN_TOKEN",
    "ServeDB",
    "candidates",
    "free_port",
    "jsonl",
    "make_settings",
    "running_server",
    "serve_db",
    "serve_pg_url",
]

ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test module, migrated to the newest schema, dropped afterwards."""
    from preftune.serve import db

    url, drop = fresh_postgres_db("preftune_serve_test")
    engine = db.make_engine(url)
    try:
        db.migrate(engine)
    finally:
        engine.dispose()
    yield url
    drop()


@dataclass
class ServeDB:
    kind: str  # "sqlite" or "postgresql"
    url: str

    def engine(self):  # noqa: ANN201
        from preftune.serve import db

        return db.make_engine(self.url)

    def query(self, sql: str, **params: Any) -> list[tuple]:
        """Run a read query on a separate connection: what is committed, not what a session believes."""
        from sqlalchemy import text

        engine = self.engine()
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params)]
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def serve_db(request, tmp_path) -> ServeDB:
    """An empty, migrated feedback database of each kind."""
    from preftune.serve import db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'feedback.db'}"
        engine = db.make_engine(url)
        db.migrate(engine)
        engine.dispose()
        return ServeDB("sqlite", url)
    url = request.getfixturevalue("serve_pg_url")
    from sqlalchemy import text

    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE judgements, assignments, tasks, raters RESTART IDENTITY CASCADE"))
    engine.dispose()
    return ServeDB("postgresql", url)


def make_settings(url: str, **overrides: Any):  # noqa: ANN201
    """Service settings for tests: admin token set, no background agreement refresh."""
    from preftune.serve.settings import ServeSettings

    values: dict[str, Any] = {
        "database_url": url,
        "admin_token": ADMIN_TOKEN,
        "agreement_refresh_seconds": 0,
        "auto_migrate": True,
        "log_level": "INFO",
    }
    values.update(overrides)
    return ServeSettings(**values)


def candidates(
    n: int,
    *,
    family: str = "safety",
    n_candidates: int = 3,
    prefix: str = "item",
    texts: list[str] | None = None,
    prompt: str | None = None,
) -> list[dict[str, Any]]:
    """``n`` candidates records in the ``preftune.candidates`` v1 format."""
    out = []
    for i in range(n):
        cand_texts = texts or [f"{prefix} {i} answer {k}" for k in range(n_candidates)]
        out.append(
            {
                "format": "preftune.candidates",
                "version": 1,
                "item_id": f"{prefix}-{family}-{i}",
                "prompt_id": f"p-{family}-{i}",
                "family": family,
                "tags": ["test"],
                "prompt": prompt or f"{family} prompt number {i}?",
                "candidates": [{"id": f"c{k}", "text": t} for k, t in enumerate(cand_texts)],
                "policy": "demo:policy",
                "created_at": "2025-01-01T00:00:00Z",
            }
        )
    return out


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@contextmanager
def running_server(settings) -> Iterator[str]:  # noqa: ANN001
    """A real uvicorn server for ``settings`` on 127.0.0.1 (in a thread); yields its base URL."""
    import uvicorn

    from preftune.serve.app import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="preftune-serve-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the feedback service did not become ready within 30 s")
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
