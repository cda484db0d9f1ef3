"""Studies as the administrator sees them: list with filters, and one study in full.

Patient-free by default: UIDs, accession number, StudyDate, modalities, counts and states.
The Patient ID is included only when the caller asks (``with_patient_id``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.admin import job_summary
from pacs_agent.db.models import Export, Finding, Instance, Job, Series, Study
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.retention import AIStatus, ai_status


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


@dataclass(frozen=True)
class StudyFilter:
    """Which studies to list; every given field must match. Dates are StudyDate, YYYYMMDD,
    inclusive."""

    modality: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    accession_number: str | None = None
    ai_status: AIStatus | None = None
    status: str | None = None


def _study_row(study: Study, with_patient_id: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "status": study.status,
        "completion": study.completion,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "completed_at": _iso(study.completed_at),
    }
    if with_patient_id:
        row["patient_id"] = study.patient_id
    return row


def list_studies(
    session_factory: sessionmaker[Session],
    flt: StudyFilter,
    *,
    limit: int | None = 100,
    offset: int = 0,
    with_patient_id: bool = False,
) -> list[dict[str, Any]]:
    """The matching studies, newest first: ``offset`` of them skipped, at most ``limit``."""
    with session_factory() as session:
        q = select(Study)
        if flt.modality:
            q = q.where(
                Study.id.in_(select(Series.study_id).where(Series.modality == flt.modality))
            )
        if flt.date_from:
            q = q.where(Study.study_date >= flt.date_from)
        if flt.date_to:
            q = q.where(Study.study_date <= flt.date_to)
        if flt.accession_number:
            q = q.where(Study.accession_number == flt.accession_number)
        if flt.status:
            q = q.where(Study.status == flt.status)
        q = q.order_by(Study.last_received_at.desc(), Study.id.desc())
        if flt.ai_status is None:
            q = q.offset(offset)
            if limit:
                q = q.limit(limit)
        studies = list(session.scalars(q))
        ids = [s.id for s in studies]
        jobs: dict[int, list[str]] = defaultdict(list)
        counts: dict[int, tuple[int, int, set[str]]] = {}
        for chunk in _chunks(ids):
            for study_id, status in session.execute(
                select(Job.study_id, Job.status).where(Job.study_id.in_(chunk))
            ):
                jobs[study_id].append(status)
            for study_id, n_series, n_instances in session.execute(
                select(
                    Series.study_id,
                    func.count(func.distinct(Series.id)),
                    func.count(Instance.id),
                )
                .outerjoin(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(chunk))
                .group_by(Series.study_id)
            ):
                counts[study_id] = (n_series, n_instances, set())
            for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(chunk))
            ):
                if modality and study_id in counts:
                    counts[study_id][2].add(modality)
        out = []
        for s in studies:
            state = ai_status(jobs[s.id])
            if flt.ai_status is not None and state != flt.ai_status:
                continue
            n_series, n_instances, modalities = counts.get(s.id, (0, 0, set()))
            row = _study_row(s, with_patient_id)
            row.update(
                modalities=sorted(modalities),
                series=n_series,
                instances=n_instances,
                jobs=len(jobs[s.id]),
                ai_status=state.value,
            )
            out.append(row)
        if flt.ai_status is not None:
            out = out[offset : offset + limit if limit else None]
        return out


def _chunks(ids: list[int], size: int = 500) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class StudyNotFound(LookupError):
    """No study has that Study Instance UID or accession number."""


def show_study(
    session_factory: sessionmaker[Session],
    *,
    study_uid: str | None = None,
    accession_number: str | None = None,
    with_patient_id: bool = False,
) -> list[dict[str, Any]]:
    """Each matching study in full (an accession number may name several): its series with
    instance counts, its jobs with their findings and exports. Raises StudyNotFound."""
    if (study_uid is None) == (accession_number is None):
        raise ValueError("give exactly one of study_uid and accession_number")
    with session_factory() as session:
        q = select(Study)
        q = (
            q.where(Study.study_instance_uid == study_uid)
            if study_uid
            else q.where(Study.accession_number == accession_number)
        )
        studies = list(session.scalars(q.order_by(Study.id)))
        if not studies:
            raise StudyNotFound(
                f"no study with Study Instance UID {study_uid}"
                if study_uid
                else f"no study with accession number {accession_number}"
            )
        return [_study_detail(session, s, with_patient_id) for s in studies]


def _study_detail(session: Session, study: Study, with_patient_id: bool) -> dict[str, Any]:
    series_rows = session.execute(
        select(Series, func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    series_uid = {se.id: se.series_instance_uid for se, _, _ in series_rows}
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
    job_ids = [j.id for j in jobs]
    findings: dict[int, list[dict[str, Any]]] = defaultdict(list)
    exports: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if job_ids:
        for f in session.scalars(
            select(Finding)
            .where(Finding.job_id.in_(job_ids))
            .order_by(Finding.job_id, Finding.kind, Finding.segment_number)
        ):
            findings[f.job_id].append(
                {
                    "kind": f.kind,
                    "number": f.segment_number,
                    "label": f.label,
                    "code": f"({f.code_value}, {f.code_scheme}, {f.code_meaning!r})",
                    "detected": f.detected,
                    "volume_mm3": f.volume_mm3,
                    "probability": f.probability,
                    "flag": f.flag,
                }
            )
        for e in session.scalars(
            select(Export).where(Export.job_id.in_(job_ids)).order_by(Export.id)
        ):
            exports[e.job_id].append(
                {
                    "destination": e.destination,
                    "sop_instance_uid": e.sop_instance_uid,
                    "attempt": e.attempt,
                    "status": e.status,
                    "dicom_status": e.dicom_status,
                    "error": e.error,
                    "attempted_at": _iso(e.attempted_at),
                }
            )
    row = _study_row(study, with_patient_id)
    row["ai_status"] = ai_status(JobStatus(j.status) for j in jobs).value
    row["series"] = [
        {
            "series_instance_uid": se.series_instance_uid,
            "series_number": se.series_number,
            "modality": se.modality,
            "body_part_examined": se.body_part_examined,
            "series_description": se.series_description,
            "instances": n,
            "size_bytes": int(size),
        }
        for se, n, size in series_rows
    ]
    row["instances"] = sum(s["instances"] for s in row["series"])
    row["jobs"] = [
        {
            **job_summary(j, study.study_instance_uid, series_uid.get(j.series_id, "")),
            "findings": findings[j.id],
            "exports": exports[j.id],
        }
        for j in jobs
    ]
    return row
