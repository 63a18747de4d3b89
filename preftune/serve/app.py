"""The feedback service's ASGI app: rater API, admin API, pages, health and metrics.

``create_app(settings)`` builds a self-contained app (its own engine, metrics registry and
state), so tests can run several side by side. Handlers are plain ``def`` functions: FastAPI
runs them in its thread pool, which suits the synchronous SQLAlchemy sessions, and every
write is committed before the handler returns, so an acknowledged judgement is durable.

Auth: ``Authorization: Bearer <token>``. Rater tokens are looked up by their sha256 and
compared in constant time; the admin token (``PREFTUNE_ADMIN_TOKEN``) is hashed at start and
only the hash is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from preftune import __version__
from preftune.errors import InputError
from preftune.serve import db, service
from preftune.serve.cycle import RaterRef
from preftune.serve.metrics import Metrics
from preftune.serve.middleware import BodyLimitMiddleware, ObservabilityMiddleware
from preftune.serve.schemas import JudgementIn, RaterIn
from preftune.serve.settings import ServeSettings, load_settings

log = logging.getLogger("preftune.serve")

STATIC = resources.files("preftune.serve") / "static"
JSONL = "application/x-ndjson"


class FastJSONResponse(JSONResponse):
    """JSON encoded with orjson: the rater API's hot answers (a task with its texts) in a few microseconds."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class HTTPError(Exception):
    """An error answered as ``{"detail": message}`` with a status (and optional headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _unauthorized(detail: str) -> HTTPError:
    return HTTPError(401, detail, {"WWW-Authenticate": 'Bearer realm="preftune"'})


@dataclass
class ServiceState:
    settings: ServeSettings
    engine: Engine
    sessions: sessionmaker[Session]
    metrics: Metrics
    admin_token_hash: str | None
    head_revision: str
    migrated: bool = False
    background: list[asyncio.Task[Any]] = field(default_factory=list)

    def refresh_agreement(self) -> dict[str, Any]:
        result = service.agreement(self.sessions, n_resamples=200)
        self.metrics.set_agreement(result["families"])
        return result


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _rater(session: Session, request: Request) -> RaterRef:
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing rater token: send 'Authorization: Bearer <token>' (ask an admin for a token)")
    rater = service.authenticate(session, token)
    if rater is None:
        raise _unauthorized("invalid rater token")
    return rater


def _admin(state: ServiceState, request: Request) -> None:
    if state.admin_token_hash is None:
        raise HTTPError(403, "admin endpoints are disabled: set PREFTUNE_ADMIN_TOKEN on the service")
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing admin token: send 'Authorization: Bearer <PREFTUNE_ADMIN_TOKEN>'")
    if not service.token_matches(token, state.admin_token_hash):
        raise _unauthorized("invalid admin token")


def _summarise_validation(exc: RequestValidationError) -> tuple[int, str, list[dict[str, Any]]]:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
        return 400, f"malformed JSON body: {ctx.get('error', 'could not be parsed')}", []
    parts = []
    clean = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
        clean.append({"loc": loc, "msg": e.get("msg"), "type": e.get("type")})
    return 422, "; ".join(parts), clean


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the service for ``settings`` (default: from the ``PREFTUNE_*`` environment)."""
    settings = settings or load_settings()
    logging.getLogger("preftune.serve").setLevel(settings.log_level)
    engine = db.make_engine(
        settings.resolved_database_url(),
        pool_size=settings.db_pool_size,
        pre_ping=settings.db_pre_ping,
        pool_timeout=settings.db_pool_timeout_seconds,
    )
    sessions = db.make_sessionmaker(engine)

    def pending() -> int:
        with sessions() as s:
            n = service.pending_tasks(s, settings.ratings_per_task)
            s.commit()
            return n

    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    state = ServiceState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        metrics=Metrics(pending),
        admin_token_hash=service.hash_token(admin) if admin else None,
        head_revision=db.head_revision(),
    )
    del admin

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Handlers run in anyio's thread pool (40 threads by default). More handler threads than
        # kept database connections make the pool open overflow connections under load and close
        # them again when they come back (a PostgreSQL backend started and torn down, and its
        # statements prepared, per burst), and every extra runnable thread competes for the GIL
        # with the event loop. So as many threads as kept connections, plus two for the endpoints
        # without one (health, metrics, pages); requests beyond wait in the event loop, cheaply.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size + 2
        if settings.auto_migrate and not state.migrated:
            await anyio.to_thread.run_sync(db.migrate, engine)
            state.migrated = True
        if engine.dialect.name == "postgresql":
            await anyio.to_thread.run_sync(db.warm_pool, engine, settings.db_pool_size)
        if settings.agreement_refresh_seconds > 0:
            state.background.append(asyncio.create_task(_refresh_agreement_forever(state)))
        state.background.append(asyncio.create_task(_release_expired_forever(state)))
        log.info(
            "feedback service ready",
            extra={
                "database": db.redact_url(settings.resolved_database_url()),
                "ratings_per_task": settings.ratings_per_task,
                "admin_enabled": state.admin_token_hash is not None,
                "version": __version__,
            },
        )
        try:
            yield
        finally:
            for task in state.background:
                task.cancel()
            for task in state.background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            engine.dispose()
            log.info("feedback service stopped")

    app = FastAPI(
        title="preftune feedback service",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its scripts from a CDN: not inside a cluster, not under our CSP
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.preftune = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=state.metrics)
    _exception_handlers(app)
    _routes(app, state)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


async def _refresh_agreement_forever(state: ServiceState) -> None:
    while True:
        try:
            await anyio.to_thread.run_sync(state.refresh_agreement)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - keep refreshing; the endpoint reports errors to callers
            log.warning("agreement gauges not refreshed: %s", err)
        await asyncio.sleep(state.settings.agreement_refresh_seconds)


async def _release_expired_forever(state: ServiceState) -> None:
    """Free the slots of lapsed leases now and then (the hand-out also does it when it finds nothing free)."""
    interval = max(5.0, min(60.0, state.settings.assignment_ttl_seconds / 4))

    def sweep() -> int:
        with state.sessions() as s:
            return service.release_expired(s)

    while True:
        await asyncio.sleep(interval)
        try:
            released = await anyio.to_thread.run_sync(sweep)
            if released:
                log.info("expired assignments released", extra={"released": released})
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - try again next time
            log.warning("expired assignments not released: %s", err)


def _exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(service.ServiceError)
    async def _service_error(_request: Request, exc: service.ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail, errors = _summarise_validation(exc)
        body: dict[str, Any] = {"detail": detail}
        if errors:
            body["errors"] = errors
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        # The traceback is logged by the access middleware; the client gets no internals.
        return JSONResponse({"detail": "internal error; the service logs have the details"}, status_code=500)

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", str(exc.orig or exc).splitlines()[0])
        return JSONResponse({"detail": "database unavailable; retry shortly"}, status_code=503)

    @app.exception_handler(DBAPIError)
    async def _db_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.error("database error: %s", str(exc.orig or exc).splitlines()[0])
        return JSONResponse({"detail": "database error; retry shortly"}, status_code=503)


def _routes(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings
    sessions = state.sessions

    # ------------------------------------------------------------------ operations

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """The process is up (liveness): no database call, so a slow database does not restart pods."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        """The database answers and has this version's schema (readiness)."""
        reason = db.check_ready(state.engine, state.head_revision)
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def rater_page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> FileResponse:
        return FileResponse(str(STATIC / "admin.html"), media_type="text/html")

    # ------------------------------------------------------------------ rater API

    @app.get("/api/me")
    def me(request: Request) -> dict[str, Any]:
        with sessions() as s:
            rater = _rater(s, request)
            progress = service.rater_progress(s, rater, settings.ratings_per_task)
            return {
                "name": rater.name,
                "judgements": progress["judgements"],
                "remaining": progress["remaining"],
                "ratings_per_task": settings.ratings_per_task,
                "undo_seconds": settings.undo_seconds,
            }

    @app.get("/api/tasks/next", responses={204: {"description": "No task left for this rater"}})
    def next_task(request: Request) -> Response:
        with sessions() as s:
            rater = _rater(s, request)
            view = service.next_task_view(
                s, rater, ratings_per_task=settings.ratings_per_task, ttl_seconds=settings.assignment_ttl_seconds
            )
        if view is None:
            return Response(status_code=204)
        return FastJSONResponse(view)

    @app.get("/api/tasks/{task_id}")
    def get_task(task_id: int, request: Request) -> dict[str, Any]:
        with sessions() as s:
            rater = _rater(s, request)
            view = service.task_view(service.get_own_task(s, rater, task_id))
            s.commit()
            return view

    @app.post("/api/tasks/{task_id}/skip")
    def skip(task_id: int, request: Request) -> dict[str, Any]:
        with sessions() as s:
            rater = _rater(s, request)
            assignment = service.skip_task(s, rater, task_id)
            return {"task_id": assignment.task_id, "status": assignment.status}

    @app.post("/api/judgements", status_code=201)
    def submit(
        payload: JudgementIn,
        request: Request,
        next: bool = Query(  # noqa: A002 - the query parameter's name
            False, description="Also reserve the next task and answer it as next_task (one transaction)."
        ),
    ) -> JSONResponse:
        if payload.written is not None and len(payload.written) > settings.max_text_chars:
            raise service.InvalidError(
                f"written: {len(payload.written)} characters, the limit is {settings.max_text_chars} "
                "(PREFTUNE_MAX_TEXT_CHARS)"
            )
        with sessions() as s:
            rater = _rater(s, request)
            record, created, next_view = service.submit_and_next(
                s,
                rater,
                payload,
                next_task=next,
                ratings_per_task=settings.ratings_per_task,
                ttl_seconds=settings.assignment_ttl_seconds,
            )
        if created:
            state.metrics.judgements.labels(family=record["family"]).inc()
            log.info(
                "judgement stored",
                extra={
                    "judgement_id": record["judgement_id"],
                    "task_id": record["task_id"],
                    "rater": record["rater_id"],
                },
            )
        if next:
            record = {**record, "next_task": next_view}
        return FastJSONResponse(record, status_code=201 if created else 200)

    @app.post("/api/judgements/{judgement_id}/undo")
    def undo(judgement_id: str, request: Request) -> dict[str, Any]:
        """Take back your last judgement within PREFTUNE_UNDO_SECONDS; its task is yours to judge again."""
        with sessions() as s:
            rater = _rater(s, request)
            view = service.undo_judgement(
                s,
                rater,
                judgement_id,
                window_seconds=settings.undo_seconds,
                ttl_seconds=settings.assignment_ttl_seconds,
            )
        state.metrics.undone.labels(family=view["family"]).inc()
        log.info("judgement undone", extra={"judgement_id": judgement_id, "rater": rater.name})
        return {"undone": judgement_id, "task": view}

    @app.get("/api/judgements")
    def my_judgements(
        request: Request, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)
    ) -> dict[str, Any]:
        with sessions() as s:
            rater = _rater(s, request)
            own = service.list_own_judgements(s, rater, limit=limit, offset=offset)
            items = [service.judgement_record(j, with_uid=True) for j in own]
            s.commit()
            return {"judgements": items, "limit": limit, "offset": offset}

    @app.get("/api/judgements/{judgement_id}")
    def my_judgement(judgement_id: str, request: Request) -> dict[str, Any]:
        with sessions() as s:
            rater = _rater(s, request)
            record = service.judgement_record(service.get_own_judgement(s, rater, judgement_id), with_uid=True)
            s.commit()
            return record

    # ------------------------------------------------------------------ admin API

    @app.post("/api/admin/raters", status_code=201)
    def add_rater(payload: RaterIn, request: Request) -> dict[str, Any]:
        _admin(state, request)
        with sessions() as s:
            rater, token = service.create_rater(s, payload.name)
        log.info("rater added", extra={"rater": rater.name})
        return {"name": rater.name, "token": token, "note": "store this token now: it is not shown again"}

    @app.post("/api/admin/raters/{name}/disable")
    def disable_rater(name: str, request: Request) -> dict[str, Any]:
        """Revoke a rater's token (their judgements are kept)."""
        _admin(state, request)
        with sessions() as s:
            rater = service.disable_rater(s, name)
        log.info("rater disabled", extra={"rater": rater.name})
        return {"name": rater.name, "disabled": True}

    @app.get("/api/admin/raters")
    def raters(request: Request) -> dict[str, Any]:
        _admin(state, request)
        with sessions() as s:
            out = service.list_raters(s)
            s.commit()
        return {"raters": out}

    @app.post("/api/admin/tasks/import")
    async def import_tasks(request: Request) -> dict[str, Any]:
        """Body: candidates JSONL (collect's output). All records are checked before any is stored."""
        _admin(state, request)
        body = await request.body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HTTPError(400, f"body is not UTF-8 (byte {err.start})") from None
        records = service.parse_candidates_jsonl(
            text.splitlines(), source="body", max_text_chars=settings.max_text_chars
        )

        def store() -> service.ImportResult:
            with sessions() as s:
                return service.import_tasks(s, records, source="body")

        result = await anyio.to_thread.run_sync(store)
        log.info("tasks imported", extra=result.to_dict())
        return result.to_dict()

    @app.get("/api/admin/export")
    def export(
        request: Request,
        since: datetime | None = Query(None, description="ISO 8601; judgements stored at or after this time."),
        until: datetime | None = Query(None, description="ISO 8601; judgements stored before this time."),
        family: str | None = Query(None, max_length=100),
    ) -> StreamingResponse:
        """Judgements as ``preftune.judgement`` v1 JSONL, oldest first."""
        _admin(state, request)

        def lines() -> Iterator[bytes]:
            for rec in service.iter_export(sessions, since=since, until=until, family=family):
                yield (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")

        return StreamingResponse(
            lines(), media_type=JSONL, headers={"content-disposition": 'attachment; filename="judgements.jsonl"'}
        )

    @app.get("/api/admin/agreement")
    def agreement(
        request: Request,
        family: str | None = Query(None, max_length=100),
        confidence: float = Query(0.95, gt=0.5, lt=1.0),
        n_resamples: int = Query(1000, ge=50, le=10_000),
        seed: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Agreement per family (``preftune.agreement.agreement_by_family``: the same figures as check-fit)."""
        _admin(state, request)
        result = service.agreement(sessions, family=family, confidence=confidence, n_resamples=n_resamples, seed=seed)
        state.metrics.set_agreement(result["families"])
        return result

    @app.get("/api/admin/stats")
    def stats(request: Request) -> dict[str, Any]:
        _admin(state, request)
        with sessions() as s:
            out = service.stats(s, settings.ratings_per_task)
            s.commit()
        return out
