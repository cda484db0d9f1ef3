"""Export a job's results to the configured destinations (runs on the io queue).

Each destination (DICOM C-STORE, optionally over TLS, or DICOMweb STOW-RS) gets the job's SEG
and SR. A destination that fails is tried again after an exponentially growing wait, up to its
``max_attempts``; then the job ends ``export_failed`` with the reason, and
:func:`requeue_export` (the ``pacs-agent retry`` command) starts a new round. Every attempt at
every object is a row in ``exports`` (destination, attempt, time, status, error).

A job that failed for good may carry a failure notice (an SR saying the AI could not process
the series, and why: :mod:`pacs_agent.notices`) as its ``sr_path``. The exporter sends it the
same way and records the same ``exports`` rows, and the job stays ``failed``; a notice that
cannot be delivered adds that to the job's reason.

Sending again never duplicates: the objects carry deterministic UIDs, so a PACS that already
holds one keeps one copy (DESIGN invariant 3). A new round skips the destinations that already
hold every object of this run of the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import DicomDestination, DicomWebDestination, ExportSettings, Settings
from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Export, Job, utcnow
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.net.scu import StoreOutcome, client_tls_context, store_files
from pacs_agent.net.stow import StowAuth, stow_files

log = logging.getLogger(__name__)

#: The SOP classes the exporter sends (docs/conformance.md, SCU table).
EXPORTED_SOP_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage)

Destination = DicomDestination | DicomWebDestination
#: Sends files to one destination: one outcome per file; raises ConnectionError (or OSError)
#: when the destination cannot be reached at all.
Sender = Callable[[Destination, Sequence[Path]], list[StoreOutcome]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one destination is tried."""

    max_attempts: int
    initial_s: float
    factor: float
    max_s: float


def retry_policy(export: ExportSettings, destination: Destination) -> RetryPolicy:
    """The destination's policy: its own ``max_attempts`` or the section's."""
    return RetryPolicy(
        max_attempts=destination.max_attempts or export.max_attempts,
        initial_s=export.backoff_initial_s,
        factor=export.backoff_factor,
        max_s=export.backoff_max_s,
    )


def backoff_s(policy: RetryPolicy, failed_attempts: int) -> float | None:
    """Seconds to wait after ``failed_attempts`` failures before the next attempt, or None
    when the policy allows no more attempts. ``initial * factor**(n-1)``, capped at ``max_s``."""
    if failed_attempts < 1:
        return 0.0
    if failed_attempts >= policy.max_attempts:
        return None
    return float(min(policy.max_s, policy.initial_s * policy.factor ** (failed_attempts - 1)))


def send(settings: Settings, destination: Destination, paths: Sequence[Path]) -> list[StoreOutcome]:
    """Send ``paths`` to ``destination`` (C-STORE or STOW-RS); one outcome per file.

    Raises AssociationFailed or StowFailed (ConnectionError) when it cannot be reached.
    """
    timeout_s = settings.export.timeout_s
    if isinstance(destination, DicomWebDestination):
        auth = StowAuth(
            username=destination.username,
            password=destination.password.get_secret_value() if destination.password else None,
            token=destination.token.get_secret_value() if destination.token else None,
        )
        return stow_files(
            url=destination.url,
            paths=paths,
            auth=auth,
            ca_file=destination.ca_file,
            timeout_s=timeout_s,
        )
    tls = (
        client_tls_context(
            ca_file=destination.tls_ca,
            certificate=destination.tls_certificate,
            private_key=destination.tls_private_key,
            check_hostname=destination.tls_check_hostname,
        )
        if destination.tls
        else None
    )
    return store_files(
        host=destination.host,
        port=destination.port,
        called_ae=destination.ae_title,
        calling_ae=settings.export.calling_ae_title,
        paths=paths,
        timeout_s=timeout_s,
        tls=tls,
    )


@dataclass(frozen=True)
class _File:
    path: Path
    sop_instance_uid: str


def _already_sent(session: Session, job: Job, destination: str) -> set[str]:
    """SOP Instance UIDs this run of the job (results made at or after ``started_at``) has
    already delivered to ``destination``."""
    query = select(Export.sop_instance_uid).where(
        Export.job_id == job.id, Export.destination == destination, Export.status == "sent"
    )
    if job.started_at is not None:
        query = query.where(Export.attempted_at >= job.started_at)
    return set(session.scalars(query))


def _attempt(
    settings: Settings,
    destination: Destination,
    files: Sequence[_File],
    sender: Sender,
    job_id: int,
    attempt: int,
    now: Callable[[], datetime],
) -> tuple[list[Export], list[_File], str | None]:
    """One attempt: (rows to record, files still to send, the last error)."""
    at = now()
    try:
        outcomes = sender(destination, [f.path for f in files])
    except (ConnectionError, OSError) as exc:
        error = str(exc) or type(exc).__name__
        rows = [
            Export(
                job_id=job_id,
                destination=destination.name,
                sop_instance_uid=f.sop_instance_uid,
                attempt=attempt,
                status="failed",
                error=error[:2000],
                attempted_at=at,
            )
            for f in files
        ]
        return rows, list(files), error
    rows = []
    left: list[_File] = []
    last_error: str | None = None
    for f, outcome in zip(files, outcomes, strict=True):
        rows.append(
            Export(
                job_id=job_id,
                destination=destination.name,
                sop_instance_uid=outcome.sop_instance_uid,
                attempt=attempt,
                status="sent" if outcome.ok else "failed",
                dicom_status=outcome.status,
                error=outcome.error[:2000] if outcome.error else None,
                attempted_at=at,
            )
        )
        if not outcome.ok:
            left.append(f)
            last_error = f"{f.path.name}: {outcome.error}"
    return rows, left, last_error


def export_job(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_id: int,
    *,
    sender: Sender | None = None,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = utcnow,
) -> str:
    """Send the job's SEG and SR to every destination; record each attempt.

    Only a job in ``exporting`` is exported (anything else is skipped and said so). Each
    destination is tried up to its ``max_attempts`` with exponential backoff between attempts;
    a destination that already holds every object of this run is skipped. Ends in
    ``exported``, or ``export_failed`` with the reason of each destination that failed.
    ``sender``, ``sleep`` and ``now`` are the network, the wait and the clock.
    """
    send_to: Sender = sender or (lambda d, p: send(settings, d, p))
    with session_factory() as session:
        job = session.get(Job, job_id)
        notice = job is not None and job.status == JobStatus.FAILED.value and bool(job.sr_path)
        if job is None or (job.status != JobStatus.EXPORTING.value and not notice):
            return f"skipped: job {job_id} is {job.status if job else 'missing'}"
        paths = [settings.results_dir / p for p in (job.seg_path, job.sr_path) if p]
        reason = job.reason or ""
        sent = {d.name: _already_sent(session, job, d.name) for d in settings.export.destinations}
    try:
        files = [_File(p, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]
    except (OSError, InvalidDicomError, AttributeError) as exc:
        if notice:
            return _notice_undelivered(
                session_factory, job_id, reason, [f"unreadable: {type(exc).__name__}: {exc}"]
            )
        reason = f"result file unreadable: {type(exc).__name__}: {exc}"
        done = now()
        with session_factory.begin() as session:
            transition(
                session,
                job_id,
                JobStatus.EXPORT_FAILED,
                only_from=[JobStatus.EXPORTING],
                reason=reason[:2000],
                updated_at=done,
                finished_at=done,
            )
        log.error("job %d: %s", job_id, reason)
        return "export_failed"
    errors: list[str] = []
    for destination in settings.export.destinations:
        pending = [f for f in files if f.sop_instance_uid not in sent[destination.name]]
        if not pending:
            log.info("job %d: %s already holds every object", job_id, destination.name)
            continue
        policy = retry_policy(settings.export, destination)
        attempt = 0
        while pending:
            attempt += 1
            rows, pending, error = _attempt(
                settings, destination, pending, send_to, job_id, attempt, now
            )
            with session_factory.begin() as session:
                session.add_all(rows)
                # A visible heartbeat: the sweeper leaves an export that moves alone.
                transition(
                    session,
                    job_id,
                    JobStatus.EXPORTING,
                    only_from=[JobStatus.EXPORTING],
                    updated_at=now(),
                )
            if not pending:
                break
            wait = backoff_s(policy, attempt)
            if wait is None:
                errors.append(f"{destination.name}: {attempt} attempt(s), last error: {error}")
                break
            log.warning(
                "job %d: export to %s failed (attempt %d of %d): %s; again in %.1f s",
                job_id,
                destination.name,
                attempt,
                policy.max_attempts,
                error,
                wait,
            )
            sleep(wait)
    if notice:
        if errors:
            return _notice_undelivered(session_factory, job_id, reason, errors)
        log.info("job %d: failure notice sent", job_id)
        return "notice_sent"
    done = now()
    with session_factory.begin() as session:
        if errors:
            transition(
                session,
                job_id,
                JobStatus.EXPORT_FAILED,
                only_from=[JobStatus.EXPORTING],
                reason="; ".join(errors)[:2000],
                updated_at=done,
                finished_at=done,
            )
            log.warning("job %d: export failed: %s", job_id, "; ".join(errors))
            return "export_failed"
        transition(
            session,
            job_id,
            JobStatus.EXPORTED,
            only_from=[JobStatus.EXPORTING],
            reason=None,
            updated_at=done,
            finished_at=done,
        )
    log.info("job %d: exported to %d destination(s)", job_id, len(settings.export.destinations))
    return "exported"


def _notice_undelivered(
    session_factory: sessionmaker[Session], job_id: int, reason: str, errors: list[str]
) -> str:
    """Add to a failed job's reason that its failure notice did not reach the destinations."""
    note = f"{reason} [failure notice not delivered: {'; '.join(errors)}]"
    with session_factory.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.FAILED.value)
            .values(reason=note[:2000])
            .execution_options(synchronize_session=False)
        )
    log.warning("job %d: failure notice not delivered: %s", job_id, "; ".join(errors))
    return "notice_failed"


def requeue_export(session_factory: sessionmaker[Session], job_id: int, now: datetime) -> bool:
    """Start a new export round of a job in ``export_failed``: it moves to ``exporting``
    (reason cleared) and True is returned; the caller then sends the export task
    (``Dispatcher.send_export(job_id)``). False, and nothing changes, for a job in any other
    state or a missing one. Destinations that already hold every object are skipped."""
    with session_factory.begin() as session:
        return start_export_round(session, job_id, now)


def start_export_round(session: Session, job_id: int, now: datetime) -> bool:
    """``export_failed`` -> ``exporting`` (reason cleared) inside the caller's transaction."""
    return transition(
        session,
        job_id,
        JobStatus.EXPORTING,
        only_from=[JobStatus.EXPORT_FAILED],
        reason=None,
        updated_at=now,
    )


def exports_of(session: Session, job_id: int) -> list[Export]:
    """Every recorded attempt of a job, oldest first."""
    return list(session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.id)))
