"""Export a job's results to the configured destinations (runs on the io queue)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import Settings
from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Export, Job, utcnow
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.net.scu import AssociationFailed, store_files

log = logging.getLogger(__name__)


def export_job(settings: Settings, session_factory: sessionmaker[Session], job_id: int) -> str:
    """Send the job's SEG and SR to every destination; record each attempt.

    Ends in ``exported`` or ``export_failed`` (with the reason). Idempotent: the objects carry
    deterministic UIDs, so a second export replaces in the PACS, never duplicates.
    """
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.EXPORTING.value:
            return f"skipped: job {job_id} is {job.status if job else 'missing'}"
        files = [settings.results_dir / p for p in (job.seg_path, job.sr_path) if p]
    errors: list[str] = []
    for dest in settings.export.destinations:
        attempts: list[Export] = []
        try:
            outcomes = store_files(
                host=dest.host,
                port=dest.port,
                called_ae=dest.ae_title,
                calling_ae=settings.export.calling_ae_title,
                paths=files,
                timeout_s=settings.export.timeout_s,
            )
            for o in outcomes:
                attempts.append(
                    Export(
                        job_id=job_id,
                        destination=dest.name,
                        sop_instance_uid=o.sop_instance_uid,
                        status="sent" if o.ok else "failed",
                        dicom_status=o.status,
                        error=o.error,
                    )
                )
                if not o.ok:
                    errors.append(f"{dest.name}: {Path(o.path).name}: {o.error}")
        except (AssociationFailed, OSError) as exc:
            errors.append(f"{dest.name}: {exc}")
            attempts.append(
                Export(
                    job_id=job_id,
                    destination=dest.name,
                    sop_instance_uid="",
                    status="failed",
                    error=str(exc),
                )
            )
        with session_factory.begin() as session:
            session.add_all(attempts)
    now = utcnow()
    with session_factory.begin() as session:
        if errors:
            transition(
                session,
                job_id,
                JobStatus.EXPORT_FAILED,
                reason="; ".join(errors)[:2000],
                updated_at=now,
                finished_at=now,
            )
            log.warning("job %d: export failed: %s", job_id, "; ".join(errors))
            return "export_failed"
        transition(session, job_id, JobStatus.EXPORTED, updated_at=now, finished_at=now)
    log.info("job %d: exported to %d destination(s)", job_id, len(settings.export.destinations))
    return "exported"


def exports_of(session: Session, job_id: int) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.id)))
