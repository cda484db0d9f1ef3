"""Job rows and their guarded transitions.

Every status change is one conditional UPDATE ``... WHERE id = :id AND status IN (:sources)``:
of two workers racing for a job, exactly one sees a row count of 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from pacs_agent.db.models import Job
from pacs_agent.domain.jobs import JobStatus, sources_of


def transition(
    session: Session,
    job_id: int,
    to: JobStatus,
    *,
    only_from: Iterable[JobStatus] | None = None,
    **values: Any,
) -> bool:
    """Move job ``job_id`` to ``to`` if its current state allows it; True if it moved.

    ``only_from`` narrows the allowed source states further (it never widens them).
    """
    sources = set(sources_of(to))
    if only_from is not None:
        sources &= set(only_from)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in sources]))
        .values(status=to.value, **values)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def jobs_in(session: Session, statuses: Iterable[JobStatus], limit: int = 100) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.status.in_([s.value for s in statuses]))
            .order_by(Job.priority.desc(), Job.id)
            .limit(limit)
        )
    )


def expired_leases(session: Session, now: datetime) -> list[int]:
    return list(
        session.scalars(
            select(Job.id).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
        )
    )


def stale_queued(session: Session, before: datetime) -> list[int]:
    return list(
        session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.queued_at < before)
        )
    )
