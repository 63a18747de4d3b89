"""Run the feedback service under uvicorn, with JSON logs and a graceful shutdown.

On SIGTERM (what Kubernetes sends) uvicorn stops accepting connections, lets in-flight
requests finish for up to ``PREFTUNE_SHUTDOWN_TIMEOUT_SECONDS``, then runs the app's
shutdown (which closes the database pool) and exits 0.
"""

from __future__ import annotations

import logging.config
import signal
import threading

from preftune.serve.settings import ServeSettings, load_settings


def run_server(host: str = "0.0.0.0", port: int = 8080, settings: ServeSettings | None = None) -> None:
    """Migrate (if enabled), then serve until SIGTERM/SIGINT. Errors before serving raise PreftuneError."""
    import uvicorn

    from preftune.serve import db
    from preftune.serve.app import create_app
    from preftune.serve.logs import logging_config

    settings = settings or load_settings()
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    app = create_app(settings)
    state = app.state.preftune
    if settings.auto_migrate:
        # Before uvicorn starts, so that a bad URL or an unreachable database is one clear error line.
        db.migrate(state.engine)
        state.migrated = True
    if settings.workers > 1:
        # Several worker processes share the socket; each builds its own app (and pool) from the
        # same PREFTUNE_* environment. The supervisor stops them all on SIGTERM.
        del app
        state.engine.dispose()
        uvicorn.run(
            "preftune.serve.app:create_app",
            factory=True,
            workers=settings.workers,
            host=host,
            port=port,
            log_config=log_config,
            access_log=False,
            timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
            server_header=False,
            timeout_keep_alive=75,
            lifespan="on",
        )
        return
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=log_config,
        access_log=False,  # the app writes its own JSON access log, without query strings
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        server_header=False,
        # Longer than the idle timeout of common proxies (ingress-nginx: 60 s), so the proxy, not the
        # app, closes idle keep-alive connections: no request is sent on a connection being closed.
        timeout_keep_alive=75,
        lifespan="on",
    )
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it shut down on, after restoring the previous handler; with this
        # no-op handler in place a SIGTERM shutdown ends with exit code 0 instead of death by signal.
        signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    uvicorn.Server(config).run()
