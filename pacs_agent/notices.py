"""Failure notices: when a job fails for good, the PACS is told so (an SR with the reason).

:func:`write_failure_notice` builds the notice of a failed job
(:func:`pacs_agent.dicom.notice.build_failure_notice`) from the headers of its spooled
instances, writes it under the results directory and records it on the job (``sr_path`` and
``sr_sop_instance_uid``; a failed job has no SEG). The caller then sends the export task: the
exporter delivers a failed job's notice through the same destinations, retries and ``exports``
rows as any result, and leaves the job ``failed``.

Switched off by ``export.failure_notices = false``. A job whose instances are gone or cannot
be read gets no notice (there is no patient or study to address it to); its reason says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.catalog import CatalogError, load_catalog
from pacs_agent.config import Settings
from pacs_agent.db.models import Instance, Job, Series, Study, utcnow
from pacs_agent.dicom.io import write_dataset
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.results import AlgorithmSpec
from pacs_agent.domain.uids import device_uid, failure_notice_uids
from pacs_agent.storage.spool import Spool

__all__ = ["send_failure_notice", "write_failure_notice"]

log = logging.getLogger(__name__)


def _update_failed(session: Session, job_id: int, **values: object) -> None:
    """Change a ``failed`` job's columns; it stays failed (no state transition)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.FAILED.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _algorithm(settings: Settings, name: str, version: str | None) -> AlgorithmSpec:
    try:
        return load_catalog(settings.models_dir).get(name).algorithm(settings.uid_root)
    except CatalogError:
        # The card is gone (the job may have failed for that very reason).
        version = version or "unknown"
        return AlgorithmSpec(name, version, device_uid(settings.uid_root, name, version))


def write_failure_notice(
    settings: Settings, session_factory: sessionmaker[Session], job_id: int
) -> Path | None:
    """Build, write and record the failure notice of a ``failed`` job; its path, or None when
    notices are off, the job is not failed, or its instances cannot be read (then the job's
    reason says that no notice was sent). Raises OSError when the file cannot be written."""
    if not settings.export.failure_notices:
        return None
    spool = Spool(settings.spool_dir)
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.FAILED.value:
            return None
        series = session.get(Series, job.series_id)
        study = session.get(Study, job.study_id)
        assert series is not None and study is not None
        paths = [
            spool.path(p)
            for p in session.scalars(select(Instance.path).where(Instance.series_id == series.id))
        ]
        reason = job.reason or "unknown"
        name, version = job.model_name, job.model_version
        study_uid, series_uid = study.study_instance_uid, series.series_instance_uid
    headers: list[Dataset] = []
    for path in paths:
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as exc:
            log.warning("job %d: instance %s unreadable for the notice: %s", job_id, path.name, exc)
    headers = [ds for ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    if not headers:
        with session_factory.begin() as session:
            _update_failed(
                session,
                job_id,
                reason=f"{reason} [no failure notice: no readable source instance]"[:2000],
            )
        log.warning("job %d: no failure notice (no readable source instance)", job_id)
        return None
    from pacs_agent.dicom.notice import build_failure_notice  # highdicom: only when needed

    algorithm = _algorithm(settings, name, version)
    notice_series, notice_uid = failure_notice_uids(
        settings.uid_root, study_uid, series_uid, name, version or "unknown"
    )
    notice = build_failure_notice(
        headers,
        algorithm,
        reason,
        series_instance_uid=notice_series,
        sop_instance_uid=notice_uid,
    )
    relative = Path(study_uid) / str(job_id) / f"SR_NOTICE_{notice_uid}.dcm"
    write_dataset(notice, settings.results_dir / relative)
    with session_factory.begin() as session:
        _update_failed(
            session,
            job_id,
            seg_path=None,
            seg_sop_instance_uid=None,
            sr_path=str(relative),
            sr_sop_instance_uid=notice_uid,
            updated_at=utcnow(),
        )
    log.info("job %d: failure notice %s written", job_id, notice_uid)
    return settings.results_dir / relative


def send_failure_notice(
    settings: Settings,
    session_factory: sessionmaker[Session],
    send_export: Callable[[int], None],
    job_id: int,
) -> bool:
    """Tell the destinations that job ``job_id`` failed for good: write its notice and queue
    the export that delivers it (``send_export``, e.g. ``Dispatcher.send_export``). True when
    a notice was queued. Never raises: the job has failed already; a notice that cannot be made
    or queued is logged (the export sweeper does not pick up failed jobs, so it is not sent)."""
    if not settings.export.failure_notices or not settings.export.destinations:
        return False
    try:
        path = write_failure_notice(settings, session_factory, job_id)
    except Exception as exc:
        log.error("job %d: failure notice not written: %s", job_id, exc, exc_info=exc)
        return False
    if path is None:
        return False
    try:
        send_export(job_id)
    except Exception as exc:
        log.warning("job %d: could not queue the failure notice (%s)", job_id, exc)
        return False
    return True
