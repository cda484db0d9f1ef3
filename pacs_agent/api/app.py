"""The FastAPI application: JSON API under ``/api/v1``, ``/health``, ``/ready``, ``/metrics``
and the dashboard, built from one Settings object by ``create_app``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent import __version__
from pacs_agent.api.actions import ActionError
from pacs_agent.api.auth import TokenBook
from pacs_agent.api.deps import Reader
from pacs_agent.api.docs import add_docs
from pacs_agent.api.metrics import make_registry
from pacs_agent.config import Settings

log = logging.getLogger("pacs_agent.api")
access_log = logging.getLogger("pacs_agent.api.access")


@dataclass
class AppState:
    """What every request handler may use; set on ``app.state.pacs``."""

    settings: Settings
    session_factory: sessionmaker[Session]
    tokens: TokenBook
    registry: CollectorRegistry


def broker_problem(settings: Settings, timeout_s: float = 2.0) -> str | None:
    """Why the broker cannot take messages now, or None."""
    url = settings.broker_url
    if url is None:
        broker = settings.broker_dir
        if not broker.is_dir():
            return f"embedded broker directory {broker} does not exist (is serve running?)"
        if not os.access(broker, os.W_OK):
            return f"embedded broker directory {broker} is not writable"
        return None
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:
        return f"broker unreachable ({type(exc).__name__})"
    return None


def database_problem(session_factory: sessionmaker[Session]) -> str | None:
    try:
        with session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return f"database unreachable ({type(exc).__name__})"
    return None


def create_app(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session] | None = None,
    listener_registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The application for ``settings``. ``listener_registry`` holds the counters of a
    DICOM listener in this process (``serve``), added to ``/metrics``."""
    from pacs_agent.api import dashboard, routes

    if session_factory is None:
        from pacs_agent.db.session import make_engine, make_session_factory

        session_factory = make_session_factory(make_engine(settings.database_url))
    state = AppState(
        settings,
        session_factory,
        TokenBook(settings.api),
        make_registry(session_factory, settings.spool_dir, listener_registry),
    )
    app = FastAPI(
        title="pacs-agent",
        version=__version__,
        description=(
            "AI results beside your PACS: studies, series, jobs, findings, exports and the "
            "audit log; reprocess, retry and cancel. Send `Authorization: Bearer <token>`."
        ),
        # FastAPI's pages load their scripts from a CDN; ours are served here (api.docs).
        docs_url=None,
        redoc_url=None,
    )
    add_docs(app)
    app.state.pacs = state

    @app.exception_handler(ActionError)
    async def _action_error(_request: Request, exc: ActionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    if settings.api.access_log:

        @app.middleware("http")
        async def _access(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            # The path only: a query string may carry an accession number.
            start = time.perf_counter()
            response = await call_next(request)
            access_log.info(
                "%s %s %d %.1f ms",
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - start) * 1000,
            )
            return response

    @app.get("/health", tags=["operations"], summary="The process is alive.")
    def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/ready",
        tags=["operations"],
        summary="Database and broker reachable (503 otherwise, with the reasons).",
        responses={503: {"description": "Not ready; `problems` says why."}},
    )
    def ready() -> JSONResponse:
        problems = [
            p
            for p in (database_problem(state.session_factory), broker_problem(state.settings))
            if p
        ]
        body: dict[str, Any] = {"status": "not ready" if problems else "ready"}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics (text exposition format).",
        response_class=Response,
    )
    def metrics(_who: Reader) -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes.router, prefix="/api/v1")
    app.include_router(dashboard.router)
    return app
