"""How a failed model run ends: retried with backoff (transient) or failed at once (permanent).

A transient error is one a later try may not meet: a database or broker connection dropped, a
file system hiccup, the GPU out of memory because another job held it. Everything else (bad
input, an unknown model, a bug, the soft time limit) is permanent: the job fails with its
reason, visible in ``pacs-agent jobs show``, and (``export.failure_notices``, on by default) a
failure notice SR goes to the export destinations so the PACS side knows no result will come.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Job, utcnow
from pacs_agent.domain.jobs import JobStatus, TransientError, retry_delay
from pacs_agent.notices import send_failure_notice
from pacs_agent.notify.outbox import JOB_FAILED, create_notifications
from pacs_agent.scheduler import time_limits

if TYPE_CHECKING:
    from workers.celery_app import WorkerContext

log = logging.getLogger(__name__)

_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (MONAI wraps the
    errors of its transforms in ``RuntimeError('applying transform ...')``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def failure_reason(exc: BaseException) -> str:
    """The reason shown on a failed job: a time limit says so, even wrapped."""
    for cause in causes(exc):
        if isinstance(cause, SoftTimeLimitExceeded):
            return "SoftTimeLimitExceeded: the model run took longer than its soft time limit"
    return f"{type(exc).__name__}: {exc}"[:2000]


def is_transient(exc: BaseException) -> bool:
    """True when trying again later may succeed (looking through wrapped exceptions)."""
    chain = causes(exc)
    if any(isinstance(c, SoftTimeLimitExceeded) for c in chain):
        return False
    return any(_transient(c) for c in chain)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError | OperationalError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS):
        return True
    # torch.cuda.OutOfMemoryError, matched by name: this module does not import torch.
    return type(exc).__name__ == "OutOfMemoryError"


def fail_or_retry(ctx: WorkerContext, job_id: int, exc: BaseException) -> str:
    """End a running job after ``exc``: back to ``queued`` with a delayed message when the
    error is transient and attempts remain, else ``failed`` with the reason."""
    reason = failure_reason(exc)
    w = ctx.settings.worker
    with ctx.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        attempts, priority, model = job.attempts, job.priority, job.model_name
    delay = None
    if is_transient(exc):
        delay = retry_delay(attempts, w.max_attempts, w.retry_backoff_s, w.retry_backoff_max_s)
    now = utcnow()
    if delay is not None:
        with ctx.session_factory.begin() as session:
            moved = transition(
                session,
                job_id,
                JobStatus.QUEUED,
                only_from=[JobStatus.RUNNING],
                where=[Job.worker == ctx.name],
                queued_at=now + timedelta(seconds=delay),
                updated_at=now,
                lease_expires_at=None,
                reason=f"transient error, try {attempts + 1} in {delay:g} s: {reason}",
            )
        if moved:
            log.warning("job %d: transient %s; retrying in %g s", job_id, type(exc).__name__, delay)
            try:
                ctx.dispatcher.send_inference(
                    job_id, priority, time_limits(ctx.settings, model), countdown_s=delay
                )
            except Exception as send_exc:  # the sweeper sends stale queued jobs again
                log.warning("job %d: could not queue the retry (%s)", job_id, send_exc)
        return "retrying"
    log.error("job %d failed: %s", job_id, reason, exc_info=exc)
    with ctx.session_factory.begin() as session:
        if transition(
            session,
            job_id,
            JobStatus.FAILED,
            only_from=[JobStatus.RUNNING],
            where=[Job.worker == ctx.name],
            reason=reason,
            finished_at=now,
            updated_at=now,
            lease_expires_at=None,
        ):
            # "The AI could not process this series", to the notifiers that want it.
            create_notifications(session, ctx.settings.notify, job_id, JOB_FAILED, now)
    send_failure_notice(ctx.settings, ctx.session_factory, ctx.dispatcher.send_export, job_id)
    return "failed"
