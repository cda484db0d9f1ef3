"""Administrator actions on jobs: list, reprocess, retry, cancel; each action is audited.

The database is the outbox: ``reprocess`` and ``retry`` of a failed job create or move jobs to
``pending`` and the scheduler of ``pacs-agent serve`` sends them, so these commands work while
the broker is down. A retried export goes back to ``exporting`` and its task is sent at once
(the sweeper sends it again if the broker is away).
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.catalog import Catalog, CatalogError
from pacs_agent.db.jobs import series_facts, transition
from pacs_agent.db.models import AuditEntry, Job, Series, Study
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.retention import IN_FLIGHT  # jobs still on their way: left alone
from pacs_agent.domain.routing import Rule, select_models
from pacs_agent.export import start_export_round

#: Jobs in these states hold a result; reprocessing without --force leaves them alone.
DONE = frozenset({JobStatus.SUCCEEDED, JobStatus.EXPORTED})


def default_actor() -> str:
    """Who runs this command: the login name and host."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an admin command is about; every given field must match."""

    statuses: tuple[JobStatus, ...] = ()
    model: str | None = None
    study_uid: str | None = None
    accession_number: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    job_ids: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.statuses
            or self.model
            or self.study_uid
            or self.accession_number
            or self.created_from
            or self.created_to
            or self.job_ids
        )

    def touches_study(self) -> bool:
        """Whether a condition is on the study (then ``conditions`` need the join)."""
        return bool(self.study_uid or self.accession_number)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The filter's conditions on ``Job`` (and on ``Study`` when ``touches_study``)."""
        c: list[ColumnElement[bool]] = []
        if self.statuses:
            c.append(Job.status.in_([s.value for s in self.statuses]))
        if self.model:
            c.append(Job.model_name == self.model)
        if self.study_uid:
            c.append(Study.study_instance_uid == self.study_uid)
        if self.accession_number:
            c.append(Study.accession_number == self.accession_number)
        if self.created_from:
            c.append(Job.created_at >= self.created_from)
        if self.created_to:
            c.append(Job.created_at < self.created_to)
        if self.job_ids:
            c.append(Job.id.in_(self.job_ids))
        return c

    def query(self) -> Select[Job]:
        return select(Job).join(Study, Study.id == Job.study_id).where(*self.conditions())


def find_jobs(session: Session, flt: JobFilter, limit: int | None = None) -> list[Job]:
    q = flt.query().order_by(Job.id.desc())
    if limit:
        q = q.limit(limit)
    return list(session.scalars(q))


def job_summary(job: Job, study_uid: str, series_uid: str) -> dict[str, Any]:
    """A job as plain data (no PHI: UIDs, ids, states and times only)."""

    def iso(t: datetime | None) -> str | None:
        return t.isoformat() if t else None

    return {
        "id": job.id,
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "model": job.model_name,
        "model_version": job.model_version,
        "rule": job.rule,
        "priority": job.priority,
        "status": job.status,
        "reason": job.reason,
        "attempts": job.attempts,
        "worker": job.worker,
        "created_at": iso(job.created_at),
        "queued_at": iso(job.queued_at),
        "started_at": iso(job.started_at),
        "succeeded_at": iso(job.succeeded_at),
        "finished_at": iso(job.finished_at),
        "load_s": job.load_s,
        "inference_s": job.inference_s,
        "write_s": job.write_s,
        "seg_sop_instance_uid": job.seg_sop_instance_uid,
        "sr_sop_instance_uid": job.sr_sop_instance_uid,
        "ai_flag": job.ai_flag,
        "ai_flag_reason": job.ai_flag_reason,
    }


def list_jobs(
    session_factory: sessionmaker[Session], flt: JobFilter, limit: int | None = 500
) -> list[dict[str, Any]]:
    with session_factory() as session:
        q = (
            flt.query()
            .add_columns(Study.study_instance_uid, Series.series_instance_uid)
            .join(Series, Series.id == Job.series_id)
            .order_by(Job.id.desc())
        )
        if limit:
            q = q.limit(limit)
        return [job_summary(j, st, se) for j, st, se in session.execute(q)]


def audit(
    session: Session,
    actor: str,
    action: str,
    arguments: dict[str, Any],
    outcome: str,
    job_ids: Iterable[int],
    now: datetime,
) -> None:
    """Record one administrator action (in the caller's transaction)."""
    session.add(
        AuditEntry(
            at=now,
            actor=actor,
            action=action,
            arguments=json.dumps(arguments, default=str, sort_keys=True),
            outcome=outcome,
            job_ids=json.dumps(sorted(job_ids)),
        )
    )


# -- reprocess ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySelector:
    """Which studies to reprocess: by UID, accession number or StudyDate range (YYYYMMDD)."""

    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None

    def is_empty(self) -> bool:
        return not (self.study_uids or self.accession_numbers or self.date_from or self.date_to)


def find_studies(session: Session, sel: StudySelector) -> list[tuple[int, str]]:
    """(id, Study Instance UID) of the matching studies that are complete."""
    q = select(Study.id, Study.study_instance_uid).where(Study.status == "complete")
    if sel.study_uids:
        q = q.where(Study.study_instance_uid.in_(sel.study_uids))
    if sel.accession_numbers:
        q = q.where(Study.accession_number.in_(sel.accession_numbers))
    if sel.date_from:
        q = q.where(Study.study_date >= sel.date_from)
    if sel.date_to:
        q = q.where(Study.study_date <= sel.date_to)
    return [(sid, uid) for sid, uid in session.execute(q.order_by(Study.id))]


@dataclass
class PlannedRun:
    study_instance_uid: str
    series_instance_uid: str
    model: str
    rule: str
    action: str  # "create" or "skip"
    why: str
    job_id: int | None = None
    superseded: list[int] = field(default_factory=list)


def _plan_study(
    session: Session,
    study_id: int,
    study_uid: str,
    rules: Sequence[Rule],
    model: str | None,
    force: bool,
) -> tuple[list[PlannedRun], dict[str, int], dict[tuple[str, str], int]]:
    facts, series_ids = series_facts(session, study_id)
    selections = [s for s in select_models(facts, rules) if model is None or s.model == model]
    priorities = {(s.series_instance_uid, s.model): s.priority for s in selections}
    plan: list[PlannedRun] = []
    for s in selections:
        existing = list(
            session.scalars(
                select(Job).where(
                    Job.series_id == series_ids[s.series_instance_uid],
                    Job.model_name == s.model,
                    Job.status != JobStatus.SUPERSEDED.value,
                )
            )
        )
        in_flight = [j.id for j in existing if JobStatus(j.status) in IN_FLIGHT]
        done = [j.id for j in existing if JobStatus(j.status) in DONE]
        run = PlannedRun(study_uid, s.series_instance_uid, s.model, s.rule, "create", "")
        if in_flight:
            run.action, run.why = "skip", f"job {in_flight[0]} is still in progress"
        elif done and not force:
            run.action, run.why = "skip", f"job {done[0]} already has results (use --force)"
        else:
            run.superseded = [
                j.id
                for j in existing
                if JobStatus(j.status) not in IN_FLIGHT and j.status != JobStatus.CANCELLED.value
            ]
            run.why = "forced" if done else "no result yet"
        plan.append(run)
    if not selections:
        plan.append(
            PlannedRun(
                study_uid,
                "",
                model or "",
                "",
                "skip",
                f"no rule selects {model or 'any model'} for any series of the study "
                "(see pacs-agent rules test)",
            )
        )
    return plan, series_ids, priorities


def plan_reprocess(
    session_factory: sessionmaker[Session],
    rules: Sequence[Rule],
    sel: StudySelector,
    *,
    model: str | None,
    force: bool,
) -> list[PlannedRun]:
    """What ``reprocess`` would do, read only: nothing is written, not even an audit row."""
    out: list[PlannedRun] = []
    with session_factory() as session:
        for study_id, study_uid in find_studies(session, sel):
            out.extend(_plan_study(session, study_id, study_uid, rules, model, force)[0])
    return out


def reprocess(
    session_factory: sessionmaker[Session],
    catalog: Catalog,
    rules: Sequence[Rule],
    sel: StudySelector,
    *,
    model: str | None,
    force: bool,
    dry_run: bool,
    actor: str,
    now: datetime,
    progress: Callable[[int], None] = lambda _n: None,
) -> list[PlannedRun]:
    """Create new jobs for the matching studies (one transaction per study).

    Each (series, model) pair the rules select gets a new pending job, unless a job for it
    is still in progress, or already has results and ``force`` is off. With ``force``, the
    older finished jobs of the pair are superseded. Results carry deterministic UIDs, so
    the new SEG and SR replace the old ones in the PACS. ``dry_run`` changes nothing.
    """
    with session_factory() as session:
        studies = find_studies(session, sel)
    out: list[PlannedRun] = []
    for study_id, study_uid in studies:
        with session_factory.begin() as session:
            plan, series_ids, priorities = _plan_study(
                session, study_id, study_uid, rules, model, force
            )
            if not dry_run:
                for run in plan:
                    if run.action != "create":
                        continue
                    for old in run.superseded:
                        transition(
                            session,
                            old,
                            JobStatus.SUPERSEDED,
                            updated_at=now,
                            reason=f"reprocessed by {actor}",
                        )
                    job = Job(
                        study_id=study_id,
                        series_id=series_ids[run.series_instance_uid],
                        model_name=run.model,
                        rule=run.rule,
                        priority=priorities[(run.series_instance_uid, run.model)],
                        status=JobStatus.PENDING.value,
                        created_at=now,
                        updated_at=now,
                    )
                    try:
                        job.model_version = catalog.get(run.model).version
                    except CatalogError as exc:
                        job.status = JobStatus.FAILED.value
                        job.reason = str(exc)
                        job.finished_at = now
                    session.add(job)
                    session.flush()
                    run.job_id = job.id
        out.extend(plan)
        progress(1)
    with session_factory.begin() as session:
        created = [r.job_id for r in out if r.job_id is not None]
        audit(
            session,
            actor,
            "reprocess",
            {**asdict(sel), "model": model, "force": force, "dry_run": dry_run},
            f"{len(studies)} studies, {len(created)} jobs created"
            + (" (dry run)" if dry_run else ""),
            created,
            now,
        )
    return out


# -- retry and cancel ----------------------------------------------------------------------


@dataclass
class ActionResult:
    moved: list[int] = field(default_factory=list)
    unchanged: list[tuple[int, str]] = field(default_factory=list)
    exports_to_send: list[int] = field(default_factory=list)


def retry(
    session_factory: sessionmaker[Session],
    flt: JobFilter,
    *,
    actor: str,
    now: datetime,
) -> ActionResult:
    """Failed jobs go back to ``pending`` (attempts reset; the scheduler sends them);
    ``export_failed`` jobs go back to ``exporting`` and are listed in ``exports_to_send``
    for the caller to send. Jobs in any other state are left as they are."""
    result = ActionResult()
    with session_factory.begin() as session:
        jobs = find_jobs(session, flt)
        for job in jobs:
            if job.status == JobStatus.FAILED.value:
                ok = transition(
                    session,
                    job.id,
                    JobStatus.PENDING,
                    only_from=[JobStatus.FAILED],
                    attempts=0,
                    reason=None,
                    finished_at=None,
                    updated_at=now,
                )
            elif job.status == JobStatus.EXPORT_FAILED.value:
                ok = start_export_round(session, job.id, now)
                if ok:
                    result.exports_to_send.append(job.id)
            else:
                result.unchanged.append((job.id, f"{job.status}: nothing to retry"))
                continue
            if ok:
                result.moved.append(job.id)
            else:
                result.unchanged.append((job.id, "changed state meanwhile"))
        audit(
            session,
            actor,
            "retry",
            _filter_args(flt),
            f"{len(result.moved)} retried, {len(result.unchanged)} unchanged",
            result.moved,
            now,
        )
    return result


CANCELLABLE = (
    JobStatus.PENDING,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.FAILED,
    JobStatus.EXPORT_FAILED,
)


def cancel(
    session_factory: sessionmaker[Session],
    flt: JobFilter,
    *,
    actor: str,
    now: datetime,
) -> ActionResult:
    """Cancel matching jobs that have not finished. A running job's worker finds it
    cancelled when it is done and its results are discarded (never exported)."""
    result = ActionResult()
    with session_factory.begin() as session:
        for job in find_jobs(session, flt):
            if JobStatus(job.status) not in CANCELLABLE:
                result.unchanged.append((job.id, f"{job.status}: cannot be cancelled"))
                continue
            if transition(
                session,
                job.id,
                JobStatus.CANCELLED,
                reason=f"cancelled by {actor}",
                finished_at=now,
                updated_at=now,
            ):
                result.moved.append(job.id)
            else:
                result.unchanged.append((job.id, "changed state meanwhile"))
        audit(
            session,
            actor,
            "cancel",
            _filter_args(flt),
            f"{len(result.moved)} cancelled, {len(result.unchanged)} unchanged",
            result.moved,
            now,
        )
    return result


def send_exports(send: Callable[[int], None], job_ids: Iterable[int]) -> list[tuple[int, str]]:
    """Send the export tasks of retried ``export_failed`` jobs; returns (job id, error) for
    those the broker refused (the sweeper sends them once it is back)."""
    unsent = []
    for job_id in job_ids:
        try:
            send(job_id)
        except Exception as exc:
            unsent.append((job_id, f"broker unavailable ({exc}); sent later"))
    return unsent


def _filter_args(flt: JobFilter) -> dict[str, Any]:
    data = asdict(flt)
    data["statuses"] = [s.value for s in flt.statuses]
    return data
