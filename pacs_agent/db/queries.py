"""Read queries of the HTTP API and dashboard: pages of studies, series, jobs, findings,
exports and audit entries, as plain data.

No patient names, IDs or birth dates leave here: studies are shown by UID, accession number,
date and description. Every list is one page (``limit``/``offset``, newest first) with the
total count of matching rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pacs_agent.admin import JobFilter, job_summary
from pacs_agent.db.models import AuditEntry, Export, Finding, Instance, Job, Series, Study
from pacs_agent.domain.flags import PRIORITY, AIFlag
from pacs_agent.domain.flags import study_flag as domain_study_flag
from pacs_agent.domain.jobs import JobStatus

#: Job states in which a study's AI result is not there yet (succeeded: results are there).
_WAITING = {"pending", "queued", "running"}


@dataclass(frozen=True)
class PageRequest:
    limit: int = 50
    offset: int = 0


@dataclass
class Page:
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int

    def as_json(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "total": self.total,
            "limit": self.limit,
            "offset": self.offset,
        }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _page(session: Session, q: Any, page: PageRequest, order: Any) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
    rows = list(session.execute(q.order_by(order).limit(page.limit).offset(page.offset)))
    return rows, int(total)


# -- studies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFilter:
    status: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    modality: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None


def _study_query(flt: StudyFilter) -> Select[Any]:
    q = select(Study)
    if flt.status:
        q = q.where(Study.status == flt.status)
    if flt.accession_number:
        q = q.where(Study.accession_number == flt.accession_number)
    if flt.study_instance_uid:
        q = q.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.modality:
        q = q.where(
            Study.id.in_(select(Series.study_id).where(Series.modality == flt.modality.upper()))
        )
    if flt.received_from:
        q = q.where(Study.first_received_at >= flt.received_from)
    if flt.received_to:
        q = q.where(Study.first_received_at < flt.received_to)
    return q


def study_flag(jobs: Sequence[dict[str, Any]], findings: Sequence[dict[str, Any]]) -> str:
    """The study-level AI flag shown on the worklist (none, positive, critical): the highest of
    the flags recorded with its current jobs (``jobs.ai_flag``, from the model cards' ``[flags]``
    rules, the flag the notifiers send). A job done before flags were recorded counts as
    ``positive`` when one of its findings is flagged."""
    levels: list[AIFlag] = []
    for job in jobs:
        if job["status"] in ("superseded", "cancelled"):
            continue
        if job.get("ai_flag"):
            levels.append(AIFlag(job["ai_flag"]))
        elif any(f["flag"] for f in findings if f["job_id"] == job["id"]):
            levels.append(AIFlag.POSITIVE)
    return domain_study_flag(levels).value


def ai_status(job_statuses: Sequence[str]) -> str:
    """One word for a study's AI state, from its (not superseded) jobs."""
    live = [s for s in job_statuses if s not in ("superseded", "cancelled")]
    if not live:
        return "cancelled" if job_statuses else "no jobs"
    if any(s in ("failed", "export_failed") for s in live):
        return "failed"
    if any(s in _WAITING for s in live):
        return "in progress"
    return "done"


def _finding_json(f: Finding) -> dict[str, Any]:
    data = {
        "id": f.id,
        "job_id": f.job_id,
        "kind": f.kind,
        "number": f.segment_number,
        "label": f.label,
        "code": {"value": f.code_value, "scheme": f.code_scheme, "meaning": f.code_meaning},
        "detected": f.detected,
        "voxel_count": f.voxel_count,
        "volume_mm3": f.volume_mm3,
        "mean_hu": f.mean_hu,
        "probability": f.probability,
        "threshold": f.threshold,
        "flag": f.flag,
        "component_count": f.component_count,
        "largest_component_mm3": f.largest_component_mm3,
        "min_volume_mm3": f.min_volume_mm3,
    }
    return data


def _study_rows(session: Session, studies: Sequence[Study]) -> list[dict[str, Any]]:
    """Studies as worklist rows: modalities, counts, jobs, findings and flags (a fixed number
    of queries for the whole page, not one per study)."""
    ids = [s.id for s in studies]
    modalities: dict[int, set[str]] = defaultdict(set)
    n_series: dict[int, int] = defaultdict(int)
    for study_id, modality in session.execute(
        select(Series.study_id, Series.modality).where(Series.study_id.in_(ids))
    ):
        n_series[study_id] += 1
        if modality:
            modalities[study_id].add(modality)
    n_instances = dict(
        session.execute(
            select(Series.study_id, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        ).all()
    )
    jobs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    job_ids = []
    for job_id, study_id, model, status, reason, ai_flag in session.execute(
        select(Job.id, Job.study_id, Job.model_name, Job.status, Job.reason, Job.ai_flag)
        .where(Job.study_id.in_(ids))
        .order_by(Job.id)
    ):
        jobs[study_id].append(
            {
                "id": job_id,
                "model": model,
                "status": status,
                "reason": reason,
                "ai_flag": ai_flag,
            }
        )
        job_ids.append(job_id)
    findings: dict[int, list[dict[str, Any]]] = defaultdict(list)
    live_jobs = {
        j["id"]: sid
        for sid, js in jobs.items()
        for j in js
        if j["status"] not in ("superseded", "cancelled")
    }
    for f in session.scalars(
        select(Finding).where(Finding.job_id.in_(list(live_jobs))).order_by(Finding.id)
    ):
        findings[live_jobs[f.job_id]].append(_finding_json(f))
    out = []
    for s in studies:
        fs = findings[s.id]
        out.append(
            {
                "id": s.id,
                "study_instance_uid": s.study_instance_uid,
                "accession_number": s.accession_number,
                "study_date": s.study_date,
                "study_description": s.study_description,
                "status": s.status,
                "modalities": sorted(modalities[s.id]),
                "series_count": n_series[s.id],
                "instance_count": int(n_instances.get(s.id, 0)),
                "first_received_at": _iso(s.first_received_at),
                "completed_at": _iso(s.completed_at),
                "ai_status": ai_status([j["status"] for j in jobs[s.id]]),
                "flag": (flag := study_flag(jobs[s.id], fs)),
                "suggested_priority": PRIORITY[AIFlag(flag)],
                "jobs": jobs[s.id],
                "findings": fs,
            }
        )
    return out


def list_studies(session: Session, flt: StudyFilter, page: PageRequest) -> Page:
    rows, total = _page(session, _study_query(flt), page, Study.id.desc())
    return Page(_study_rows(session, [r[0] for r in rows]), total, page.limit, page.offset)


def get_study(session: Session, study_uid: str) -> dict[str, Any] | None:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    (row,) = _study_rows(session, [study])
    row["series"] = list_series(session, SeriesFilter(study_uid), PageRequest(1000, 0)).items
    return row


# -- series ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFilter:
    study_instance_uid: str | None = None
    modality: str | None = None


def list_series(session: Session, flt: SeriesFilter, page: PageRequest) -> Page:
    # Counted per row of the page (by the instances' series index), not for every series.
    count = select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery()
    q = select(Series, Study.study_instance_uid, count).join(Study, Study.id == Series.study_id)
    if flt.study_instance_uid:
        q = q.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.modality:
        q = q.where(Series.modality == flt.modality.upper())
    rows, total = _page(session, q, page, Series.id.desc())
    items = [
        {
            "id": s.id,
            "series_instance_uid": s.series_instance_uid,
            "study_instance_uid": study_uid,
            "modality": s.modality,
            "body_part_examined": s.body_part_examined,
            "series_description": s.series_description,
            "series_number": s.series_number,
            "slice_thickness": s.slice_thickness,
            "instance_count": int(n or 0),
        }
        for s, study_uid, n in rows
    ]
    return Page(items, total, page.limit, page.offset)


# -- jobs --------------------------------------------------------------------------------------


def list_jobs(session: Session, flt: JobFilter, page: PageRequest) -> Page:
    # The page's ids first, from the jobs table alone when no filter is on the study (a
    # count or a deep offset then walks one index, not a join); then the page's rows.
    ids = select(Job.id).where(*flt.conditions())
    if flt.touches_study():
        ids = ids.join(Study, Study.id == Job.study_id)
    total = session.scalar(select(func.count()).select_from(ids.subquery())) or 0
    page_ids = list(
        session.scalars(ids.order_by(Job.id.desc()).limit(page.limit).offset(page.offset))
    )
    rows = session.execute(
        select(Job, Study.study_instance_uid, Series.series_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .join(Series, Series.id == Job.series_id)
        .where(Job.id.in_(page_ids))
        .order_by(Job.id.desc())
    )
    items = [job_summary(j, st, se) for j, st, se in rows]
    return Page(items, int(total), page.limit, page.offset)


def _export_json(e: Export) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "destination": e.destination,
        "sop_instance_uid": e.sop_instance_uid,
        "attempt": e.attempt,
        "status": e.status,
        "dicom_status": e.dicom_status,
        "error": e.error,
        "attempted_at": _iso(e.attempted_at),
    }


@dataclass
class JobDetail:
    summary: dict[str, Any]
    accession_number: str | None
    findings: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.summary,
            "accession_number": self.accession_number,
            "findings": self.findings,
            "exports": self.exports,
            "timeline": self.timeline,
            "audit": self.audit,
        }


def job_timeline(
    summary: dict[str, Any], exports: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The job's way through its states, from the times it keeps, oldest first."""
    events = [
        ("created", summary["created_at"]),
        ("queued", summary["queued_at"]),
        ("running", summary["started_at"]),
        ("succeeded", summary["succeeded_at"]),
    ]
    events += [
        (f"export to {e['destination']} {e['status']} (attempt {e['attempt']})", e["attempted_at"])
        for e in exports
    ]
    status = summary["status"]
    if status in ("superseded", "cancelled"):  # these keep the time of the change only
        events.append((status, summary.get("updated_at")))
    elif summary["finished_at"] and status != "succeeded":
        events.append((status, summary["finished_at"]))
    out = [{"event": what, "at": at} for what, at in events if at]
    out.sort(key=lambda e: e["at"])
    return out


def get_job(session: Session, job_id: int) -> JobDetail | None:
    row = session.execute(
        select(Job, Study.study_instance_uid, Series.series_instance_uid, Study.accession_number)
        .join(Study, Study.id == Job.study_id)
        .join(Series, Series.id == Job.series_id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    job, study_uid, series_uid, accession = row
    summary = job_summary(job, study_uid, series_uid)
    summary["seg_path"] = job.seg_path
    summary["updated_at"] = _iso(job.updated_at)
    detail = JobDetail(summary, accession)
    detail.findings = [
        _finding_json(f)
        for f in session.scalars(
            select(Finding).where(Finding.job_id == job_id).order_by(Finding.kind, Finding.id)
        )
    ]
    detail.exports = [
        _export_json(e)
        for e in session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.id))
    ]
    detail.timeline = job_timeline(summary, detail.exports)
    pattern = f"%{job_id}%"
    detail.audit = [
        _audit_json(a)
        for a in session.scalars(
            select(AuditEntry).where(AuditEntry.job_ids.like(pattern)).order_by(AuditEntry.id)
        )
        if job_id in json.loads(a.job_ids)
    ]
    return detail


# -- findings, exports, audit --------------------------------------------------------------------


@dataclass(frozen=True)
class FindingFilter:
    job_id: int | None = None
    study_instance_uid: str | None = None
    label: str | None = None
    detected: bool | None = None
    flag: bool | None = None


def list_findings(session: Session, flt: FindingFilter, page: PageRequest) -> Page:
    ids = select(Finding.id)
    if flt.study_instance_uid:
        ids = ids.join(Job, Job.id == Finding.job_id).join(Study, Study.id == Job.study_id)
        ids = ids.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.job_id is not None:
        ids = ids.where(Finding.job_id == flt.job_id)
    if flt.label:
        ids = ids.where(Finding.label == flt.label)
    if flt.detected is not None:
        ids = ids.where(Finding.detected == flt.detected)
    if flt.flag is not None:
        ids = ids.where(Finding.flag == flt.flag)
    total = session.scalar(select(func.count()).select_from(ids.subquery())) or 0
    page_ids = list(
        session.scalars(ids.order_by(Finding.id.desc()).limit(page.limit).offset(page.offset))
    )
    rows = session.execute(
        select(Finding, Job.model_name, Study.study_instance_uid)
        .join(Job, Job.id == Finding.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(Finding.id.in_(page_ids))
        .order_by(Finding.id.desc())
    )
    items = [
        {**_finding_json(f), "model": model, "study_instance_uid": study_uid}
        for f, model, study_uid in rows
    ]
    return Page(items, int(total), page.limit, page.offset)


@dataclass(frozen=True)
class ExportFilter:
    job_id: int | None = None
    destination: str | None = None
    status: str | None = None


def list_exports(session: Session, flt: ExportFilter, page: PageRequest) -> Page:
    q = select(Export)
    if flt.job_id is not None:
        q = q.where(Export.job_id == flt.job_id)
    if flt.destination:
        q = q.where(Export.destination == flt.destination)
    if flt.status:
        q = q.where(Export.status == flt.status)
    rows, total = _page(session, q, page, Export.id.desc())
    return Page([_export_json(r[0]) for r in rows], total, page.limit, page.offset)


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    actor: str | None = None
    at_from: datetime | None = None
    at_to: datetime | None = None


def _audit_json(a: AuditEntry) -> dict[str, Any]:
    return {
        "id": a.id,
        "at": _iso(a.at),
        "actor": a.actor,
        "action": a.action,
        "arguments": json.loads(a.arguments),
        "outcome": a.outcome,
        "job_ids": json.loads(a.job_ids),
    }


def list_audit(session: Session, flt: AuditFilter, page: PageRequest) -> Page:
    q = select(AuditEntry)
    if flt.action:
        q = q.where(AuditEntry.action == flt.action)
    if flt.actor:
        q = q.where(AuditEntry.actor == flt.actor)
    if flt.at_from:
        q = q.where(AuditEntry.at >= flt.at_from)
    if flt.at_to:
        q = q.where(AuditEntry.at < flt.at_to)
    rows, total = _page(session, q, page, AuditEntry.id.desc())
    return Page([_audit_json(r[0]) for r in rows], total, page.limit, page.offset)


JOB_STATES = tuple(s.value for s in JobStatus)
