"""What a notification says, read from the database once per attempt (plain data).

Builders of HL7, FHIR and webhook messages take these facts and nothing else, so they are
pure and testable without a database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Finding, Instance, Job, Notification, Series, Study
from pacs_agent.findings import study_flag_of

#: Namespace of the notifications' event ids (stable across re-sends of one notification).
_EVENT_NAMESPACE = uuid.UUID("6f1c7a52-4a0e-4f7c-9c51-0c2f3b8d9e10")


@dataclass(frozen=True)
class FindingFact:
    kind: str  # segment or classification
    number: int
    label: str
    code_value: str
    code_scheme: str
    code_meaning: str
    detected: bool
    flag: bool
    volume_mm3: float | None
    mean_hu: float | None
    probability: float | None
    threshold: float | None
    #: A segment's connected components kept after the card's thresholds, and the largest.
    component_count: int | None = None
    largest_component_mm3: float | None = None


@dataclass(frozen=True)
class PatientHeader:
    """The patient module of the study's images (read from the spool, never logged)."""

    name: str = ""
    birth_date: str = ""
    sex: str = ""
    issuer_of_patient_id: str = ""


def patient_header(path: Path) -> PatientHeader:
    """The patient attributes of one stored instance; empty when it cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError):
        return PatientHeader()
    return PatientHeader(
        name=str(ds.get("PatientName", "") or ""),
        birth_date=str(ds.get("PatientBirthDate", "") or ""),
        sex=str(ds.get("PatientSex", "") or ""),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
    )


@dataclass(frozen=True)
class NotificationFacts:
    """One notification's content: the job, its study and series, findings and flags."""

    notification_id: int
    event_id: str
    event: str  # findings or failed
    job_id: int
    job_status: str
    job_reason: str | None
    model_name: str
    model_version: str | None
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    study_description: str | None
    job_ai_flag: str | None
    study_ai_flag: str
    suggested_priority: str
    flag_reasons: tuple[str, ...]
    seg_sop_instance_uid: str | None
    sr_sop_instance_uid: str | None
    finished_at: datetime | None
    findings: tuple[FindingFact, ...]
    patient: PatientHeader = PatientHeader()


def event_id(job_id: int, notifier: str, event: str) -> str:
    """A UUID naming one notification, the same every time it is sent (receivers use it to
    drop a second copy)."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{job_id}/{notifier}/{event}"))


def load_facts(
    session: Session, notification_id: int, spool_dir: Path | None = None
) -> NotificationFacts | None:
    """The facts of one notification, or None when the row (or its job) is gone. With
    ``spool_dir`` the patient attributes come from the series' first stored instance."""
    row = session.execute(
        select(Notification, Job, Study, Series)
        .join(Job, Notification.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .join(Series, Job.series_id == Series.id)
        .where(Notification.id == notification_id)
    ).first()
    if row is None:
        return None
    n, job, study, series = row
    findings = session.scalars(
        select(Finding)
        .where(Finding.job_id == job.id)
        .order_by(Finding.kind.desc(), Finding.segment_number)
    )
    flag = study_flag_of(session, study.study_instance_uid)
    patient = PatientHeader()
    if spool_dir is not None:
        first = session.scalars(
            select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id)
        ).first()
        if first is not None:
            patient = patient_header(spool_dir / first)
    return NotificationFacts(
        patient=patient,
        notification_id=n.id,
        event_id=event_id(job.id, n.notifier, n.event),
        event=n.event,
        job_id=job.id,
        job_status=job.status,
        job_reason=job.reason,
        model_name=job.model_name,
        model_version=job.model_version,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        study_date=study.study_date,
        study_description=study.study_description,
        job_ai_flag=job.ai_flag,
        study_ai_flag=flag.flag,
        suggested_priority=flag.priority,
        flag_reasons=flag.reasons,
        seg_sop_instance_uid=job.seg_sop_instance_uid,
        sr_sop_instance_uid=job.sr_sop_instance_uid,
        finished_at=job.finished_at,
        findings=tuple(
            FindingFact(
                kind=f.kind,
                number=f.segment_number,
                label=f.label,
                code_value=f.code_value,
                code_scheme=f.code_scheme,
                code_meaning=f.code_meaning,
                detected=f.detected,
                flag=f.flag,
                volume_mm3=f.volume_mm3,
                mean_hu=f.mean_hu,
                probability=f.probability,
                threshold=f.threshold,
                component_count=f.component_count,
                largest_component_mm3=f.largest_component_mm3,
            )
            for f in findings
        ),
    )
