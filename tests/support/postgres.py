"""A fresh PostgreSQL database per test session on the local server (127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import os
import uuid

import pytest

__all__ = ["postgres_url", "fresh_postgres_db", "require_or_skip"]

PG_HOST = os.environ.get("PREFTUNE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PREFTUNE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("PREFTUNE_TEST_PG_USER", "postgres")


def require_or_skip(reason: str) -> None:
    """Missing infrastructure fails in CI (CI=true) and skips on a developer machine."""
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def _admin_connect():
    import psycopg2

    try:
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as err:
        require_or_skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable: {err}".strip())
    conn.autocommit = True
    return conn


def fresh_postgres_db(prefix: str = "preftune_test"):
    """Create a database with a unique name; returns (sqlalchemy URL, drop function)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = _admin_connect()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()

    def drop() -> None:
        c = _admin_connect()
        with c.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.close()

    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}", drop


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    url, drop = fresh_postgres_db()
    yield url
    drop()
