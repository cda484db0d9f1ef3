"""The Celery app of the worker processes, with its thin tasks.

Tasks take ids only, load what they need, call a plain function and classify the outcome
(the function ends the job in a visible state). Settings come from the same file and
environment as the service (``PACS_AGENT_CONFIG``, ``PACS_AGENT_*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import Settings, load_settings
from pacs_agent.db.jobs import renew_lease
from pacs_agent.db.models import utcnow
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.export import export_job
from pacs_agent.notify.outbox import deliver
from pacs_agent.queue import (
    EXPORT_RESULTS,
    RUN_INFERENCE,
    SEND_NOTIFICATION,
    CeleryDispatcher,
    make_celery,
)


@dataclass
class WorkerContext:
    """What one worker process holds: settings, a database session factory, loaded models."""

    settings: Settings
    session_factory: sessionmaker[Session]
    dispatcher: CeleryDispatcher
    name: str
    runners: dict[str, Any] = field(default_factory=dict)


class _ContextHolder:
    """One WorkerContext per process (engines and models never cross a fork)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._pid = -1
        self._context: WorkerContext | None = None

    def get(self) -> WorkerContext:
        if self._context is None or self._pid != os.getpid():
            engine = make_engine(self.settings.database_url)
            self._context = WorkerContext(
                settings=self.settings,
                session_factory=make_session_factory(engine),
                dispatcher=CeleryDispatcher(self.app),
                name=f"{socket.gethostname()}:{os.getpid()}",
            )
            self._pid = os.getpid()
        return self._context


log = logging.getLogger(__name__)


@contextlib.contextmanager
def lease_heartbeat(ctx: WorkerContext, job_id: int) -> Iterator[None]:
    """Renew the job's lease every third of ``worker.lease_s`` while the body runs, so a
    short lease finds a dead worker quickly and never expires under a live one."""
    lease_s = ctx.settings.worker.lease_s
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                with ctx.session_factory.begin() as session:
                    until = utcnow() + timedelta(seconds=lease_s)
                    renew_lease(session, job_id, ctx.name, until)
            except Exception as exc:  # the next beat tries again
                log.warning("job %d: lease renewal failed (%s)", job_id, exc)

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def ignore_sigterm_while_exiting(**_: object) -> None:
    """``worker_process_shutdown`` receiver: a pool process on its way out ignores SIGTERM.

    Celery's pool (billiard's threaded pool, the one used with the embedded broker) ends a
    pool process by writing its exit notice to a pipe under a lock that all pool processes
    share. It blocks SIGTERM meanwhile, but only in the writing thread, and the worker
    answers the notice with SIGTERM: another thread (torch's intra-op threads) takes that
    signal and the process dies holding the lock. Its replacement then waits for the lock
    forever and the worker runs no job again (seen after a hard time limit). Ignored, the
    signal cannot cut the notice short; billiard exits the process a second later anyway (or
    the pool's SIGKILL ends it, after a hard time limit).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = make_celery(settings)
    holder = _ContextHolder(app, settings)

    @app.task(name=RUN_INFERENCE, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_inference(*, job_id: int) -> str:
        from workers.inference import run_inference_job  # lazy: torch only where needed

        ctx = holder.get()
        with lease_heartbeat(ctx, job_id):
            return run_inference_job(ctx, job_id)

    @app.task(name=EXPORT_RESULTS, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def export_results(*, job_id: int) -> str:
        ctx = holder.get()
        return export_job(ctx.settings, ctx.session_factory, job_id)

    @app.task(name=SEND_NOTIFICATION, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def send_notification(*, notification_id: int) -> str:
        ctx = holder.get()
        return deliver(ctx.settings, ctx.session_factory, notification_id)

    return app
