"""The JSON API (``/api/v1``): thin handlers over pacs_agent.db.queries and
pacs_agent.api.actions. Lists are pages, newest first: ``limit`` (1-500, default 50) and
``offset``, with the ``total`` count of matching rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from pacs_agent.admin import JobFilter
from pacs_agent.api import actions
from pacs_agent.api.deps import DB, Admin, Reader, app_state, utc
from pacs_agent.db import queries
from pacs_agent.domain.jobs import JobStatus

router = APIRouter()

#: Text filters: printable, bounded (a NUL or control character is a 422, never a 500).
_TEXT = r"^[^\x00-\x1f\x7f]*$"
_UID = r"^[0-9]+(\.[0-9]+)*$"

Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]
StudyUID = Annotated[
    str | None, Query(max_length=64, pattern=_UID, description="Study Instance UID.")
]
Accession = Annotated[
    str | None,
    Query(max_length=16, pattern=_TEXT, description="Accession number (never logged)."),
]
Since = Annotated[datetime | None, Query(description="At or after (ISO 8601; naive is UTC).")]
Until = Annotated[datetime | None, Query(description="Before (ISO 8601; naive is UTC).")]
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
StudyUIDPath = Annotated[str, Path(max_length=64, pattern=_UID)]


class PageOut(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


def _page(page: queries.Page) -> PageOut:
    return PageOut(**page.as_json())


@router.get("/studies", response_model=PageOut, tags=["studies"])
def list_studies(
    session: DB,
    _who: Reader,
    status: Annotated[str | None, Query(pattern="^(receiving|complete)$")] = None,
    accession_number: Accession = None,
    study_instance_uid: StudyUID = None,
    modality: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9]+$")] = None,
    received_since: Since = None,
    received_until: Until = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    """Studies by first arrival, newest first, with AI status, findings and flag."""
    flt = queries.StudyFilter(
        status,
        accession_number,
        study_instance_uid,
        modality,
        utc(received_since, "received_since"),
        utc(received_until, "received_until"),
    )
    return _page(queries.list_studies(session, flt, queries.PageRequest(limit, offset)))


@router.get("/studies/{study_instance_uid}", tags=["studies"])
def get_study(study_instance_uid: StudyUIDPath, session: DB, _who: Reader) -> dict[str, Any]:
    """One study with its series, jobs and findings."""
    study = queries.get_study(session, study_instance_uid)
    if study is None:
        raise HTTPException(404, f"no study {study_instance_uid}")
    return study


@router.get("/series", response_model=PageOut, tags=["studies"])
def list_series(
    session: DB,
    _who: Reader,
    study_instance_uid: StudyUID = None,
    modality: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9]+$")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    flt = queries.SeriesFilter(study_instance_uid, modality)
    return _page(queries.list_series(session, flt, queries.PageRequest(limit, offset)))


@router.get("/jobs", response_model=PageOut, tags=["jobs"])
def list_jobs(
    session: DB,
    _who: Reader,
    status: Annotated[list[JobStatus] | None, Query(description="Repeatable.")] = None,
    model: Annotated[str | None, Query(max_length=128, pattern=_TEXT)] = None,
    study_instance_uid: StudyUID = None,
    accession_number: Accession = None,
    created_since: Since = None,
    created_until: Until = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    """Jobs, newest first (the filters of ``pacs-agent jobs list``)."""
    flt = JobFilter(
        statuses=tuple(status or ()),
        model=model,
        study_uid=study_instance_uid,
        accession_number=accession_number,
        created_from=utc(created_since, "created_since"),
        created_to=utc(created_until, "created_until"),
    )
    return _page(queries.list_jobs(session, flt, queries.PageRequest(limit, offset)))


@router.get("/jobs/{job_id}", tags=["jobs"])
def get_job(job_id: JobId, session: DB, _who: Reader) -> dict[str, Any]:
    """One job: state and reason, times (timeline), findings, export attempts, audit."""
    job = queries.get_job(session, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job.as_json()


@router.get("/findings", response_model=PageOut, tags=["findings"])
def list_findings(
    session: DB,
    _who: Reader,
    job_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    study_instance_uid: StudyUID = None,
    label: Annotated[str | None, Query(max_length=64, pattern=_TEXT)] = None,
    detected: bool | None = None,
    flag: bool | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    flt = queries.FindingFilter(job_id, study_instance_uid, label, detected, flag)
    return _page(queries.list_findings(session, flt, queries.PageRequest(limit, offset)))


@router.get("/exports", response_model=PageOut, tags=["exports"])
def list_exports(
    session: DB,
    _who: Reader,
    job_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    destination: Annotated[str | None, Query(max_length=64, pattern=_TEXT)] = None,
    status: Annotated[str | None, Query(pattern="^(sent|failed)$")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    """Export attempts (one per result object, destination and attempt)."""
    flt = queries.ExportFilter(job_id, destination, status)
    return _page(queries.list_exports(session, flt, queries.PageRequest(limit, offset)))


@router.get("/audit", response_model=PageOut, tags=["audit"])
def list_audit(
    session: DB,
    _who: Reader,
    action: Annotated[str | None, Query(pattern="^(reprocess|retry|cancel)$")] = None,
    actor: Annotated[str | None, Query(max_length=128, pattern=_TEXT)] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> PageOut:
    """Administrator actions (CLI, API and dashboard), newest first."""
    flt = queries.AuditFilter(action, actor, utc(since, "since"), utc(until, "until"))
    return _page(queries.list_audit(session, flt, queries.PageRequest(limit, offset)))


class ReprocessIn(BaseModel):
    model: str | None = Field(None, max_length=128, pattern=_TEXT)
    """Only this model (default: every model the routing rules select)."""
    force: bool = False
    """Also redo series whose results already exist (older jobs are superseded)."""
    dry_run: bool = False


_ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "The token may read only."},
    404: {"description": "No such job or study."},
    409: {"description": "The action does not apply in this state; nothing changed."},
}


@router.post("/jobs/{job_id}/retry", tags=["actions"], responses=_ACTION_ERRORS)
def retry_job(job_id: JobId, request: Request, who: Admin) -> dict[str, Any]:
    """A failed job runs again; an export_failed job is exported again (audited)."""
    state = app_state(request)
    return actions.retry_job(state.settings, state.session_factory, job_id, who.actor).as_json()


@router.post("/jobs/{job_id}/cancel", tags=["actions"], responses=_ACTION_ERRORS)
def cancel_job(job_id: JobId, request: Request, who: Admin) -> dict[str, Any]:
    """Cancel a job that has not finished (audited)."""
    state = app_state(request)
    return actions.cancel_job(state.session_factory, job_id, who.actor).as_json()


@router.post(
    "/studies/{study_instance_uid}/reprocess",
    tags=["actions"],
    responses={**_ACTION_ERRORS, 422: {"description": "Unknown model or bad body."}},
)
def reprocess_study(
    study_instance_uid: StudyUIDPath,
    request: Request,
    who: Admin,
    body: ReprocessIn | None = None,
) -> dict[str, Any]:
    """Run the models again on a complete study (the routing rules choose; audited)."""
    state = app_state(request)
    body = body or ReprocessIn()
    return actions.reprocess_study(
        state.settings,
        state.session_factory,
        study_instance_uid,
        model=body.model,
        force=body.force,
        dry_run=body.dry_run,
        actor=who.actor,
    ).as_json()
