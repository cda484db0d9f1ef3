"""Job rows and their guarded transitions.

Every status change is one conditional UPDATE ``... WHERE id = :id AND status IN (:sources)``:
of two workers racing for a job, exactly one sees a row count of 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.orm import Session

from pacs_agent.db.models import Instance, Job, Series, Study
from pacs_agent.domain.jobs import JobStatus, sources_of
from pacs_agent.domain.routing import SeriesFacts


def transition(
    session: Session,
    job_id: int,
    to: JobStatus,
    *,
    only_from: Iterable[JobStatus] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move job ``job_id`` to ``to`` if its current state allows it; True if it moved.

    ``only_from`` narrows the allowed source states further (it never widens them);
    ``where`` adds conditions (a worker ends only the run it holds: ``Job.worker == me``).
    """
    sources = set(sources_of(to))
    if only_from is not None:
        sources &= set(only_from)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in sources]), *where)
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


def count_in(session: Session, status: JobStatus) -> int:
    return int(session.scalar(select(func.count(Job.id)).where(Job.status == status.value)) or 0)


def series_facts(session: Session, study_id: int) -> tuple[list[SeriesFacts], dict[str, int]]:
    """What routing rules may test about each series of a study, and the series ids by UID."""
    study_description = (
        session.scalar(select(Study.study_description).where(Study.id == study_id)) or ""
    )
    rows = session.execute(
        select(
            Series.id,
            Series.series_instance_uid,
            Series.modality,
            Series.body_part_examined,
            Series.series_description,
            Series.image_type,
            Series.slice_thickness,
            func.count(Instance.id),
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    sop_classes: dict[int, set[str]] = {}
    callers: dict[int, set[str]] = {}
    for series_id, sop_class, caller in session.execute(
        select(Instance.series_id, Instance.sop_class_uid, Instance.calling_ae_title)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id)
        .distinct()
    ):
        sop_classes.setdefault(series_id, set()).add(sop_class)
        if caller:
            callers.setdefault(series_id, set()).add(caller)
    facts = [
        SeriesFacts(
            series_instance_uid=uid,
            modality=modality or "",
            num_instances=n,
            body_part_examined=body_part or "",
            study_description=study_description,
            series_description=description or "",
            sop_class_uids=frozenset(sop_classes.get(sid, ())),
            image_type=tuple(image_type.split("\\")) if image_type else (),
            slice_thickness=thickness,
            calling_ae_titles=frozenset(callers.get(sid, ())),
        )
        for sid, uid, modality, body_part, description, image_type, thickness, n in rows
    ]
    return facts, {uid: sid for sid, uid, *_ in rows}


def renew_lease(session: Session, job_id: int, worker: str, until: datetime) -> bool:
    """Extend the lease of a job this worker is running; False when it is not running it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(lease_expires_at=until)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1
