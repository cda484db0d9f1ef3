"""Reprocess, retry and cancel from the API and dashboard, through the CLI's own logic
(pacs_agent.admin): the same transitions, the same audit rows.

Each function checks the request first (unknown job or study: ``NotFound``; a state the
action does not apply to: ``Conflict``) so that refused input changes nothing and writes no
audit row; then it calls pacs_agent.admin, which moves the job under its conditional update.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent import admin
from pacs_agent.catalog import load_catalog
from pacs_agent.config import Settings
from pacs_agent.db.models import Job, Study, utcnow
from pacs_agent.domain.jobs import JobStatus

RETRYABLE = (JobStatus.FAILED, JobStatus.EXPORT_FAILED)


class ActionError(Exception):
    """The action was refused; ``status`` is the HTTP status, the message the reason."""

    status = 400


class NotFound(ActionError):
    status = 404


class Conflict(ActionError):
    status = 409


class Invalid(ActionError):
    status = 422


@dataclass
class ActionOutcome:
    action: str
    moved: list[int] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    created: list[int] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _job_status(session_factory: sessionmaker[Session], job_id: int) -> JobStatus:
    with session_factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise NotFound(f"no job {job_id}")
    return JobStatus(status)


def retry_job(
    settings: Settings, session_factory: sessionmaker[Session], job_id: int, actor: str
) -> ActionOutcome:
    status = _job_status(session_factory, job_id)
    if status not in RETRYABLE:
        raise Conflict(f"job {job_id} is {status.value}: only failed and export_failed retry")
    result = admin.retry(
        session_factory,
        admin.JobFilter(job_ids=(job_id,), statuses=RETRYABLE),
        actor=actor,
        now=utcnow(),
    )
    outcome = ActionOutcome(
        "retry", result.moved, [{"id": i, "why": w} for i, w in result.unchanged]
    )
    if result.exports_to_send:
        from pacs_agent.queue import CeleryDispatcher, make_celery

        dispatcher = CeleryDispatcher(make_celery(settings))
        unsent = admin.send_exports(dispatcher.send_export, result.exports_to_send)
        outcome.warnings = [f"job {i}: {why}" for i, why in unsent]
    if not result.moved:
        raise Conflict(f"job {job_id} changed state meanwhile; nothing retried")
    return outcome


def cancel_job(session_factory: sessionmaker[Session], job_id: int, actor: str) -> ActionOutcome:
    status = _job_status(session_factory, job_id)
    if status not in admin.CANCELLABLE:
        raise Conflict(f"job {job_id} is {status.value}: it cannot be cancelled")
    result = admin.cancel(
        session_factory, admin.JobFilter(job_ids=(job_id,)), actor=actor, now=utcnow()
    )
    if not result.moved:
        raise Conflict(f"job {job_id} changed state meanwhile; nothing cancelled")
    return ActionOutcome("cancel", result.moved, [{"id": i, "why": w} for i, w in result.unchanged])


def reprocess_study(
    settings: Settings,
    session_factory: sessionmaker[Session],
    study_uid: str,
    *,
    model: str | None,
    force: bool,
    dry_run: bool,
    actor: str,
) -> ActionOutcome:
    from pacs_agent.scheduler import rules_from

    with session_factory() as session:
        study_status = session.scalar(
            select(Study.status).where(Study.study_instance_uid == study_uid)
        )
    if study_status is None:
        raise NotFound(f"no study {study_uid}")
    if study_status != "complete":
        raise Conflict(f"study {study_uid} is {study_status}, not complete: wait for it")
    catalog = load_catalog(settings.models_dir)
    if model is not None and model not in catalog.models:
        known = ", ".join(sorted(catalog.models))
        raise Invalid(f"model {model!r} is not in the catalog ({known})")
    rules = rules_from(settings)
    selector = admin.StudySelector(study_uids=(study_uid,))
    preview = admin.plan_reprocess(session_factory, rules, selector, model=model, force=force)
    if not any(r.action == "create" for r in preview):
        raise Conflict("nothing to reprocess: " + "; ".join(r.why for r in preview))
    plan = admin.reprocess(
        session_factory,
        catalog,
        rules,
        selector,
        model=model,
        force=force,
        dry_run=dry_run,
        actor=actor,
        now=utcnow(),
    )
    outcome = ActionOutcome("reprocess", plan=[vars(r) for r in plan])
    outcome.created = [r.job_id for r in plan if r.job_id is not None]
    if not dry_run and not outcome.created:  # another request took them meanwhile
        raise Conflict("nothing to reprocess: " + "; ".join(r.why for r in plan))
    return outcome
