"""``preftune serve``: the feedback service and its admin commands.

``preftune serve`` runs the server; the subcommands work on the database directly (same
``PREFTUNE_DATABASE_URL`` as the server), so an operator can import tasks, add raters and
export judgements without the admin token or a running server. Heavy imports (FastAPI,
SQLAlchemy, uvicorn) happen inside the commands to keep ``preftune --help`` fast.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import typer


def _open_db(migrate: bool | None = None):  # noqa: ANN202 - (settings, sessionmaker, engine)
    """Engine and sessions for the configured database, migrated when PREFTUNE_AUTO_MIGRATE is on."""
    from preftune.serve import db
    from preftune.serve.settings import load_settings

    settings = load_settings()
    engine = db.make_engine(settings.resolved_database_url(), pool_size=2)
    if settings.auto_migrate if migrate is None else migrate:
        db.migrate(engine)
    else:
        reason = db.check_ready(engine, db.head_revision())
        if reason is not None:
            from preftune.errors import StorageError

            raise StorageError(f"feedback database {db.redact_url(settings.resolved_database_url())}: {reason}")
    return settings, db.make_sessionmaker(engine), engine


def _write_atomically(path: Path, lines) -> int:  # noqa: ANN001
    """Write lines to a temporary file beside ``path`` and rename it into place: no half-written export."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def register(app: typer.Typer) -> None:
    serve_app = typer.Typer(
        name="serve",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @serve_app.callback(invoke_without_command=True)
    def serve(
        ctx: typer.Context,
        host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
        port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    ) -> None:
        """Run the feedback service (settings from PREFTUNE_* environment variables).

        PREFTUNE_DATABASE_URL (default sqlite under the preftune home), PREFTUNE_ADMIN_TOKEN,
        PREFTUNE_RATINGS_PER_TASK, PREFTUNE_MAX_BODY_BYTES, PREFTUNE_MAX_TEXT_CHARS,
        PREFTUNE_LOG_LEVEL, PREFTUNE_AUTO_MIGRATE. Raters open http://HOST:PORT/ ; admins /admin.
        """
        if ctx.invoked_subcommand is not None:
            return
        from preftune.serve.server import run_server

        run_server(host=host, port=port)

    @serve_app.command("import-tasks")
    def import_tasks(
        file: Path = typer.Argument(
            ..., help="Candidates JSONL written by `preftune collect` (preftune.candidates v1)."
        ),
    ) -> None:
        """Import candidate sets as rating tasks (idempotent: records already present are skipped)."""
        from preftune.errors import InputError
        from preftune.serve import service

        if not file.is_file():
            raise InputError(f"{file}: no such file (expected a candidates JSONL)")
        settings, sessions, engine = _open_db()
        try:
            with open(file, encoding="utf-8") as fh:
                try:
                    records = service.parse_candidates_jsonl(
                        fh, source=str(file), max_text_chars=settings.max_text_chars
                    )
                except UnicodeDecodeError as err:
                    raise InputError(f"{file}: not UTF-8 text (byte {err.start})") from None
            with sessions() as s:
                result = service.import_tasks(s, records, source=str(file))
        finally:
            engine.dispose()
        typer.echo(
            f"imported {result.imported} task(s) from {file} ({result.unchanged} already present, "
            f"{result.received} record(s) read)"
        )

    @serve_app.command("export")
    def export(
        output: Path = typer.Option(..., "--output", "-o", help="Judgements JSONL to write (preftune.judgement v1)."),
        since: str | None = typer.Option(
            None, "--since", help="Only judgements stored at or after this ISO 8601 time."
        ),
        until: str | None = typer.Option(None, "--until", help="Only judgements stored before this ISO 8601 time."),
        family: str | None = typer.Option(None, "--family", help="Only this behaviour family."),
    ) -> None:
        """Export judgements in the format `preftune collect --format preftune` reads."""
        import json

        from preftune.serve import service

        since_dt = service.parse_iso(since, "--since") if since else None
        until_dt = service.parse_iso(until, "--until") if until else None
        _settings, sessions, engine = _open_db()
        try:
            records = service.iter_export(sessions, since=since_dt, until=until_dt, family=family)
            count = _write_atomically(output, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        finally:
            engine.dispose()
        typer.echo(f"wrote {count} judgement(s) to {output}")

    @serve_app.command("add-rater")
    def add_rater(name: str = typer.Argument(..., help="Rater name (letters, digits and _.@+-).")) -> None:
        """Add a rater and print their token (shown once; only its hash is stored)."""
        from pydantic import ValidationError

        from preftune.errors import InputError
        from preftune.serve import service
        from preftune.serve.schemas import RaterIn

        try:
            RaterIn(name=name)
        except ValidationError:
            raise InputError(
                f"rater name {name!r}: use letters, digits and _.@+- "
                "(up to 100 characters, starting with a letter or digit)"
            ) from None
        _settings, sessions, engine = _open_db()
        try:
            with sessions() as s:
                rater, token = service.create_rater(s, name)
        finally:
            engine.dispose()
        typer.echo(f"rater {rater.name} added; their token (shown only now):", err=True)
        typer.echo(token)
        sys.stdout.flush()

    @serve_app.command("migrate")
    def migrate() -> None:
        """Upgrade the feedback database to the newest schema (safe to run repeatedly)."""
        from preftune.serve import db

        _settings, _sessions, engine = _open_db(migrate=True)
        try:
            rev = db.current_revision(engine)
        finally:
            engine.dispose()
        typer.echo(f"feedback database at schema revision {rev}")

    app.add_typer(serve_app, name="serve")
