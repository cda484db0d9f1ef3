"""Unified Procedure Steps (IHE AIW-I) over the job table: workitems, subscriptions, events.

The job rows are the truth. ``refresh`` gives every job its workitem (UID derived from the
job, ``domain.uids.workitem_uid``), derives each open workitem's state with the pure
functions of ``domain.ups``, and, in the same transaction, records the N-EVENT-REPORTs owed
to subscribers in ``ups_events`` (the outbox). ``pacs_agent.net.ups`` delivers them and
answers the UPS DIMSE services with the functions here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset
from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent import admin
from pacs_agent import retrieve as qr_retrieve
from pacs_agent.catalog import load_catalog
from pacs_agent.config import Settings
from pacs_agent.db.models import Job, Series, Study, UpsEvent, UpsSubscription, UpsWorkitem
from pacs_agent.domain.jobs import TERMINAL, JobStatus
from pacs_agent.domain.uids import derive_uid, job_result_uids, workitem_uid
from pacs_agent.domain.ups import (
    FINAL,
    UPS,
    StepState,
    job_step_state,
    next_report,
    state_reports,
    study_step_state,
)
from pacs_agent.scheduler import rules_from

log = logging.getLogger(__name__)

#: Event Type IDs of the UPS Event SOP Class (PS3.4 CC.2.4.2).
STATE_REPORT = 1
CANCEL_REQUESTED = 2
PROGRESS_REPORT = 3

#: An empty workitem UID in a subscription means "every workitem" (global subscription).
GLOBAL = ""


def stored_state(item: UpsWorkitem) -> StepState:
    return StepState(UPS(item.state), item.progress, item.reason or "")


def derive_state(session: Session, item: UpsWorkitem) -> StepState:
    """What the job rows say the workitem is now (before the final-state rule)."""
    if item.job_id is not None:
        job = session.get(Job, item.job_id)
        if job is None:
            return StepState(UPS.CANCELED, 0, "job no longer exists")
        return job_step_state(JobStatus(job.status), job.reason)
    rows = session.execute(
        select(Job.status, Job.reason)
        .join(Study, Study.id == Job.study_id)
        .where(
            Study.study_instance_uid == item.study_instance_uid,
            # the jobs alive at the request or after it: not those finished before it
            or_(
                Job.created_at >= item.created_at,
                Job.updated_at >= item.created_at,
                Job.status.not_in([s.value for s in TERMINAL]),
            ),
        )
    ).all()
    state = study_step_state((JobStatus(s), r) for s, r in rows)
    if item.cancel_requested_by and state.state not in FINAL:
        return StepState(UPS.CANCELED, 0, f"cancel requested by {item.cancel_requested_by}")
    return state


def subscribers_of(session: Session, uid: str) -> list[str]:
    """AE titles subscribed to workitem ``uid``, globally or to it alone."""
    return sorted(
        set(
            session.scalars(
                select(UpsSubscription.ae_title).where(
                    UpsSubscription.workitem_uid.in_([uid, GLOBAL])
                )
            )
        )
    )


def owe(
    session: Session, uid: str, ae_titles: Sequence[str], kind: int, s: StepState, now: datetime
) -> int:
    for ae in ae_titles:
        session.add(
            UpsEvent(
                workitem_uid=uid,
                ae_title=ae,
                event_type=kind,
                state=s.state.value,
                progress=s.progress,
                reason=s.reason or None,
                created_at=now,
                attempts=0,
                next_attempt_at=now,
            )
        )
    return len(ae_titles)


def create_job_workitems(session: Session, uid_root: str, now: datetime) -> int:
    """Give every job without a workitem its own (one per AI job)."""
    rows = session.execute(
        select(Job.id, Job.model_name, Study.study_instance_uid, Series.series_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .join(Series, Series.id == Job.series_id)
        .outerjoin(UpsWorkitem, UpsWorkitem.job_id == Job.id)
        .where(UpsWorkitem.id.is_(None))
        .order_by(Job.id)
        .limit(500)
    ).all()
    globals_ = sorted(
        set(
            session.scalars(
                select(UpsSubscription.ae_title).where(UpsSubscription.workitem_uid == GLOBAL)
            )
        )
    )
    for job_id, model, study_uid, series_uid in rows:
        uid = workitem_uid(uid_root, study_uid, series_uid, model, job_id)
        session.add(
            UpsWorkitem(
                sop_instance_uid=uid,
                job_id=job_id,
                study_instance_uid=study_uid,
                state=UPS.SCHEDULED.value,
                progress=0,
                created_at=now,
                updated_at=now,
            )
        )
        # Global subscribers learn of every new workitem (PS3.4 CC.2.3.2).
        owe(session, uid, globals_, STATE_REPORT, StepState(UPS.SCHEDULED, 0), now)
    return len(rows)


def refresh(session_factory: sessionmaker[Session], uid_root: str, now: datetime) -> int:
    """Bring workitems up to date with the jobs; record the events owed. Returns their count.

    A new job's workitem is reported SCHEDULED to global subscribers; every change of state
    is reported as the standard's path requires (``domain.ups.state_reports``),
    and a change of progress alone as a Progress Report.
    """
    owed = 0
    with session_factory.begin() as session:
        create_job_workitems(session, uid_root, now)
        session.flush()
        open_items = session.scalars(
            select(UpsWorkitem).where(UpsWorkitem.state.not_in([s.value for s in FINAL]))
        ).all()
        for item in open_items:
            before = stored_state(item)
            now_state = next_report(before, derive_state(session, item))
            if now_state == before:
                continue
            subs = subscribers_of(session, item.sop_instance_uid)
            for report in state_reports(before, now_state):
                owed += owe(session, item.sop_instance_uid, subs, STATE_REPORT, report, now)
            if now_state.state == before.state == UPS.IN_PROGRESS:
                owed += owe(session, item.sop_instance_uid, subs, PROGRESS_REPORT, now_state, now)
            item.state = now_state.state.value
            item.progress = now_state.progress
            item.reason = now_state.reason or None
            item.updated_at = now
    return owed


@dataclass(frozen=True)
class Pending:
    id: int
    workitem_uid: str
    ae_title: str
    event_type: int
    state: str
    progress: int
    reason: str | None
    attempts: int


def pending_events(session: Session, now: datetime, limit: int = 200) -> dict[str, list[Pending]]:
    """Undelivered events by subscriber, oldest first; a subscriber whose oldest event is
    not due yet is left out, so each receives its events in order."""
    rows = session.scalars(
        select(UpsEvent).where(UpsEvent.delivered_at.is_(None)).order_by(UpsEvent.id).limit(limit)
    ).all()
    out: dict[str, list[Pending]] = {}
    blocked: set[str] = set()
    for e in rows:
        if e.ae_title in blocked:
            continue
        if e.ae_title not in out and e.next_attempt_at > now:
            blocked.add(e.ae_title)
            continue
        out.setdefault(e.ae_title, []).append(
            Pending(
                e.id,
                e.workitem_uid,
                e.ae_title,
                e.event_type,
                e.state,
                e.progress,
                e.reason,
                e.attempts,
            )
        )
    return out


def mark_delivered(session_factory: sessionmaker[Session], event_id: int, now: datetime) -> None:
    with session_factory.begin() as session:
        event = session.get(UpsEvent, event_id)
        if event is not None:
            event.delivered_at = now
            event.attempts += 1


def mark_failed(
    session_factory: sessionmaker[Session],
    event_id: int,
    error: str,
    settings: Settings,
    now: datetime,
) -> datetime:
    """Count a failed try and put the next one off (doubling, capped). Returns when."""
    with session_factory.begin() as session:
        event = session.get(UpsEvent, event_id)
        if event is None:
            return now
        event.attempts += 1
        wait = min(
            settings.ups.retry_max_s, settings.ups.retry_initial_s * 2 ** (event.attempts - 1)
        )
        event.next_attempt_at = now + timedelta(seconds=wait)
        event.last_error = error[:500]
        return event.next_attempt_at


# ---- what the DIMSE services ask --------------------------------------------------------


def workitem_dataset(session: Session, item: UpsWorkitem, uid_root: str) -> Dataset:
    """The workitem as a UPS data set (what N-GET and C-FIND return)."""
    ds = Dataset()
    if item.attributes:
        ds = Dataset.from_json(item.attributes)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.34.6.1"
    ds.SOPInstanceUID = item.sop_instance_uid
    ds.ProcedureStepState = item.state
    ds.StudyInstanceUID = item.study_instance_uid
    ds.setdefault("ScheduledProcedureStepPriority", "MEDIUM")
    ds.setdefault("InputReadinessState", "READY")
    ds.ScheduledProcedureStepModificationDateTime = _dt(item.updated_at)
    job = session.get(Job, item.job_id) if item.job_id is not None else None
    series_uid = ""
    if job is not None:
        series_uid = (
            session.scalar(select(Series.series_instance_uid).where(Series.id == job.series_id))
            or ""
        )
        ds.ProcedureStepLabel = f"AI: {job.model_name}"[:64]
        ds.ScheduledProcedureStepStartDateTime = _dt(job.created_at)
        inp = Dataset()
        inp.StudyInstanceUID = item.study_instance_uid
        inp.SeriesInstanceUID = series_uid
        ds.InputInformationSequence = [inp]
    progress = Dataset()
    progress.ProcedureStepProgress = item.progress
    progress.ProcedureStepProgressDescription = (job.status if job is not None else item.state)[:64]
    if item.state == UPS.CANCELED.value:
        progress.ProcedureStepCancellationDateTime = _dt(item.updated_at)
        progress.ReasonForCancellation = (item.reason or "")[:1024]
    ds.ProcedureStepProgressInformationSequence = [progress]
    if job is not None and item.state == UPS.COMPLETED.value and job.seg_sop_instance_uid:
        seg_series, _, sr_series, _ = job_result_uids(
            uid_root, item.study_instance_uid, series_uid, job.model_name, job.model_version or ""
        )
        outputs = []
        for series, sop_class, uid in (
            (seg_series, "1.2.840.10008.5.1.4.1.1.66.4", job.seg_sop_instance_uid),
            (sr_series, "1.2.840.10008.5.1.4.1.1.88.34", job.sr_sop_instance_uid),
        ):
            if not uid:
                continue
            out = Dataset()
            out.StudyInstanceUID = item.study_instance_uid
            out.SeriesInstanceUID = series
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = uid
            out.ReferencedSOPSequence = [ref]
            outputs.append(out)
        performed = Dataset()
        performed.OutputInformationSequence = outputs
        ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    return ds


def _dt(t: datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S")


def find_workitem(session: Session, uid: str) -> UpsWorkitem | None:
    return session.scalar(select(UpsWorkitem).where(UpsWorkitem.sop_instance_uid == uid))


def search(
    session: Session, *, uid: str | None, states: Sequence[str], study_uid: str | None, limit: int
) -> list[UpsWorkitem]:
    """Workitems matching a C-FIND's keys (each given key must match), newest first."""
    q = select(UpsWorkitem)
    if uid:
        q = q.where(UpsWorkitem.sop_instance_uid == uid)
    if states:
        q = q.where(UpsWorkitem.state.in_(states))
    if study_uid:
        q = q.where(UpsWorkitem.study_instance_uid == study_uid)
    return list(session.scalars(q.order_by(UpsWorkitem.id.desc()).limit(limit)))


class Refused(Exception):
    """A request refused with a UPS status; the message says why (sent as Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def create_requested(
    session_factory: sessionmaker[Session],
    settings: Settings,
    uid: str | None,
    attributes: Dataset,
    calling_ae: str,
    now: datetime,
) -> str:
    """N-CREATE: a client asks for a study to be processed. Returns the workitem UID.

    The study is named by the Input Information Sequence's Study Instance UID (or the top
    level's). A study already received is reprocessed at once (audited, actor ``ups:<AE>``);
    one not received yet is processed when it arrives: pushed, or retrieved from the PACS in
    the background when ``query_retrieve`` is configured (``retrieve_requested``).
    """
    state = str(attributes.get("ProcedureStepState", ""))
    if state != UPS.SCHEDULED.value:
        raise Refused(0xC309, f"Procedure Step State must be SCHEDULED, not {state!r}")
    study_uid = ""
    for item in attributes.get("InputInformationSequence", []):
        study_uid = str(item.get("StudyInstanceUID", "")) or study_uid
    study_uid = study_uid or str(attributes.get("StudyInstanceUID", ""))
    if not study_uid:
        raise Refused(
            0x0120, "no Study Instance UID in the Input Information Sequence: which study?"
        )
    uid = uid or derive_uid(
        settings.uid_root, "ups-request", calling_ae, study_uid, now.isoformat()
    )
    attributes.SOPInstanceUID = uid
    with session_factory.begin() as session:
        if find_workitem(session, uid) is not None:
            raise Refused(0x0111, f"workitem {uid} already exists")
        session.add(
            UpsWorkitem(
                sop_instance_uid=uid,
                study_instance_uid=study_uid,
                requested_by=calling_ae,
                attributes=attributes.to_json(),
                state=UPS.SCHEDULED.value,
                progress=0,
                created_at=now,
                updated_at=now,
            )
        )
        owe(
            session,
            uid,
            subscribers_of(session, uid),
            STATE_REPORT,
            StepState(UPS.SCHEDULED, 0),
            now,
        )
        study_status = session.scalar(
            select(Study.status).where(Study.study_instance_uid == study_uid)
        )
    if study_status is not None and study_status != "receiving":
        admin.reprocess(
            session_factory,
            load_catalog(settings.models_dir),
            rules_from(settings),
            admin.StudySelector(study_uids=(study_uid,)),
            model=None,
            force=True,
            dry_run=False,
            actor=f"ups:{calling_ae}",
            now=now,
        )
    log.info("UPS workitem %s created by %s for study %s", uid, calling_ae, study_uid)
    return uid


def awaiting_retrieve(session: Session) -> list[str]:
    """Workitems clients created that are still SCHEDULED, not cancelled, for a study that
    is not in our index at all: what ``retrieve_requested`` fetches from the PACS."""
    known = select(Study.id).where(Study.study_instance_uid == UpsWorkitem.study_instance_uid)
    return list(
        session.scalars(
            select(UpsWorkitem.sop_instance_uid)
            .where(
                UpsWorkitem.job_id.is_(None),
                UpsWorkitem.state == UPS.SCHEDULED.value,
                UpsWorkitem.cancel_requested_by.is_(None),
                ~known.exists(),
            )
            .order_by(UpsWorkitem.id)
        )
    )


def end_requested(
    session_factory: sessionmaker[Session], uid: str, reason: str, now: datetime
) -> bool:
    """End a client's workitem CANCELED with ``reason`` and owe its subscribers the report.
    False when it is already final (nothing changes)."""
    with session_factory.begin() as session:
        item = find_workitem(session, uid)
        if item is None or UPS(item.state) in FINAL:
            return False
        before = stored_state(item)
        after = StepState(UPS.CANCELED, 0, reason)
        subs = subscribers_of(session, uid)
        for report in state_reports(before, after):
            owe(session, uid, subs, STATE_REPORT, report, now)
        item.state = after.state.value
        item.progress = 0
        item.reason = reason
        item.updated_at = now
    return True


def retrieve_requested(
    session_factory: sessionmaker[Session],
    settings: Settings,
    uid: str,
    clock: Callable[[], datetime],
) -> str:
    """Retrieve the study a client's workitem names from the PACS (``query_retrieve``),
    exactly as ``pacs-agent retrieve <study>`` does (audited, actor ``ups:<AE>``): the study
    reaches our listener and is processed as if pushed, and the workitem follows its jobs.

    When nothing of the study could be brought here (the PACS is unreachable, does not have
    the study, refuses the move) the workitem ends CANCELED with the reason: a client waits
    for a final state, and this one would otherwise stay SCHEDULED for ever. A partial
    retrieve goes on with what arrived. Returns ok, partial or failed. Call it off the
    association thread: a C-MOVE takes as long as the PACS needs (``clock`` is read before
    and after it).
    """
    with session_factory() as session:
        item = find_workitem(session, uid)
        if item is None:
            return "failed"
        study_uid, actor = item.study_instance_uid, f"ups:{item.requested_by or '?'}"
    try:
        report = qr_retrieve.retrieve(
            settings, session_factory, study_uid=study_uid, actor=actor, now=clock()
        )
    except qr_retrieve.RetrieveError as exc:
        end_requested(session_factory, uid, f"retrieve from the PACS failed: {exc}", clock())
        log.warning("UPS workitem %s: retrieve of study %s failed: %s", uid, study_uid, exc)
        return "failed"
    got = next((s for s in report.studies if s.study_instance_uid == study_uid), None)
    if got is None or (got.state == "failed" and got.held_instances == 0):
        why = got.explanation if got is not None else "the PACS did not send the study"
        end_requested(session_factory, uid, f"retrieve from the PACS failed: {why}", clock())
        log.warning("UPS workitem %s: retrieve of study %s failed: %s", uid, study_uid, why)
        return "failed"
    log.info("UPS workitem %s: study %s retrieved (%s)", uid, study_uid, got.state)
    return got.state


def request_cancel(
    session_factory: sessionmaker[Session], uid: str, calling_ae: str, now: datetime
) -> int:
    """N-ACTION Request UPS Cancel: the agent, the performer, cancels the job(s) itself
    through the administrator's cancel (audited, actor ``ups:<AE>``). Returns a status."""
    with session_factory() as session:
        item = find_workitem(session, uid)
        if item is None:
            return 0xC307
        if item.state == UPS.COMPLETED.value:
            return 0xC311
        if item.state == UPS.CANCELED.value:
            return 0xB304
        job_id, study_uid = item.job_id, item.study_instance_uid
    actor = f"ups:{calling_ae}"
    if job_id is not None:
        flt = admin.JobFilter(job_ids=(job_id,))
    else:
        with session_factory.begin() as session:
            item = find_workitem(session, uid)
            assert item is not None
            item.cancel_requested_by = calling_ae[:16]
        flt = admin.JobFilter(study_uid=study_uid, statuses=admin.CANCELLABLE)
    result = admin.cancel(session_factory, flt, actor=actor, now=now)
    if job_id is not None and not result.moved:
        return 0xC313  # the job is past the point of cancelling (its results are being sent)
    return 0x0000


def subscribe(
    session_factory: sessionmaker[Session],
    settings: Settings,
    uid: str,
    ae_title: str,
    deletion_lock: bool,
    now: datetime,
) -> int:
    """N-ACTION Subscribe: ``uid`` is a workitem or the global subscription instance.

    An AE not in ``ups.subscribers`` is refused 0xC308 (the agent would not know where to
    send). The subscriber gets the current state of the workitem(s) at once (PS3.4 CC.2.3.2).
    """
    if ae_title not in {s.ae_title for s in settings.ups.subscribers}:
        return 0xC308
    with session_factory.begin() as session:
        if uid == GLOBAL:
            items = session.scalars(
                select(UpsWorkitem).where(UpsWorkitem.state.not_in([s.value for s in FINAL]))
            ).all()
        else:
            item = find_workitem(session, uid)
            if item is None:
                return 0xC307
            items = [item]
        sub = session.scalar(
            select(UpsSubscription).where(
                UpsSubscription.ae_title == ae_title, UpsSubscription.workitem_uid == uid
            )
        )
        if sub is None:
            session.add(
                UpsSubscription(
                    ae_title=ae_title, workitem_uid=uid, deletion_lock=deletion_lock, created_at=now
                )
            )
        else:
            sub.deletion_lock = deletion_lock
        for item in items:
            owe(session, item.sop_instance_uid, [ae_title], STATE_REPORT, stored_state(item), now)
    return 0x0000


def unsubscribe(
    session_factory: sessionmaker[Session], uid: str, ae_title: str, *, suspend: bool
) -> int:
    """Unsubscribe from a workitem; from the global instance it ends the global subscription
    and every one of that AE's (``suspend``: the global one only, PS3.4 CC.2.3.2)."""
    with session_factory.begin() as session:
        q = delete(UpsSubscription).where(UpsSubscription.ae_title == ae_title)
        if uid != GLOBAL or suspend:
            q = q.where(UpsSubscription.workitem_uid == uid)
        session.execute(q)
    return 0x0000
