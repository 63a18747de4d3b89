"""Database engine, sessions and migrations of the feedback service.

SQLite (the default) serialises writers: every transaction starts with ``BEGIN IMMEDIATE``
so that "read the free slots, then take one" cannot interleave between two requests, and
the file runs in WAL mode so readers do not block. PostgreSQL runs at READ COMMITTED and
the service locks rows explicitly (``SELECT ... FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from preftune.errors import ConfigError, UnreachableError

log = logging.getLogger("preftune.serve.db")

MIGRATIONS = "preftune.serve:migrations"
# pg_advisory_xact_lock key: replicas starting together run the migrations one at a time.
_MIGRATION_LOCK_KEY = 724_913_001


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str, *, pool_size: int = 10, pre_ping: bool = True, pool_timeout: int = 30) -> Engine:
    """An engine for ``url`` set up for the service's transaction discipline (see module doc)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"PREFTUNE_DATABASE_URL is not a valid SQLAlchemy URL: {redact_url(url)}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_discipline(engine)
        else:
            # A sized pool (``pool_size`` kept open, as many again under bursts); LIFO reuse keeps
            # the busy connections warm. Without pre-ping a request costs no extra round trip; a
            # connection broken by a database restart then fails one request and the pool is reset.
            engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=pre_ping,
                pool_timeout=pool_timeout,
                pool_use_lifo=True,
            )
            if parsed.get_backend_name() == "postgresql":
                from preftune.serve import pgsql

                event.listen(engine, "connect", pgsql.prepare_on_connect)
    except (NoSuchModuleError, ImportError) as err:
        raise ConfigError(f"no database driver for {redact_url(url)}: {err}") from None
    return engine


def warm_pool(engine: Engine, size: int) -> None:
    """Open ``size`` connections now (their statements prepared) rather than during the first burst of requests.

    A database that does not answer is not an error here: readiness reports it, and the pool
    opens connections on demand as usual.
    """
    conns = []
    try:
        for _ in range(size):
            conns.append(engine.connect())
    except SQLAlchemyError as err:
        log.warning("database pool not warmed: %s", str(getattr(err, "orig", None) or err).strip().splitlines()[0])
    finally:
        for conn in conns:
            conn.close()


def _sqlite_discipline(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except Exception:  # noqa: BLE001 - in-memory databases have no WAL; the default journal is fine
            pass
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction is committed on success and rolled back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(connection=None):  # noqa: ANN001, ANN202
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision shipped with this version of preftune."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the feedback service ships at least one migration"
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision recorded in the database (None when it was never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> str:
    """Upgrade the database schema to ``revision``; safe to run from several replicas at once."""
    from alembic import command

    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            command.upgrade(_alembic_config(conn), revision)
    except OperationalError as err:
        raise UnreachableError(
            f"cannot migrate the feedback database {engine.url.render_as_string(hide_password=True)}: "
            f"{str(err.orig).strip().splitlines()[0] if err.orig else err}"
        ) from None
    if engine.dialect.name == "postgresql":
        engine.dispose()  # connections opened before the schema existed hold no prepared statements
    rev = current_revision(engine)
    log.info("database schema at revision %s", rev, extra={"revision": rev})
    return rev or ""


def check_ready(engine: Engine, expected_revision: str) -> str | None:
    """None when the database answers and has the expected schema, else the reason it is not ready."""
    try:
        rev = current_revision(engine)
    except SQLAlchemyError as err:
        msg = str(getattr(err, "orig", None) or err).strip().splitlines()
        return f"database unreachable: {msg[0] if msg else type(err).__name__}"
    if rev != expected_revision:
        return f"database schema at revision {rev!r}, expected {expected_revision!r} (run `preftune serve migrate`)"
    return None
