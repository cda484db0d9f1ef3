"""The notifications outbox: rows made with the job's outcome, sent on the io queue.

States: ``pending`` (due at ``next_attempt_at``) -> ``queued`` (the scheduler handed it to
the broker) -> ``sending`` (a worker holds it) -> ``sent``; or back to ``pending`` with a
later ``next_attempt_at`` when the receiver could not be reached (backoff); or ``failed``
when the receiver refused the message (HL7 AE/AR, HTTP 4xx) or the attempts ran out. Every
change is a conditional update, so two workers never send one row at once. The scheduler's
sweep (:func:`dispatch_due`) sends what is due and takes back rows a lost message or a dead
worker left ``queued`` or ``sending`` (DESIGN invariant 2). ``notify retry`` moves ``failed``
rows back to ``pending``.

Payloads are never logged: they carry patient identifiers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import (
    FhirNotifier,
    Hl7Notifier,
    NotifySettings,
    Settings,
    WebhookNotifier,
)
from pacs_agent.db.models import Notification, utcnow
from pacs_agent.db.session import read_session
from pacs_agent.export import RetryPolicy, backoff_s
from pacs_agent.notify.errors import Refused, Unreachable
from pacs_agent.notify.facts import NotificationFacts, load_facts

log = logging.getLogger(__name__)

PENDING, QUEUED, SENDING, SENT, FAILED = "pending", "queued", "sending", "sent", "failed"
STATES = (PENDING, QUEUED, SENDING, SENT, FAILED)
FINDINGS, JOB_FAILED = "findings", "failed"

NotifierSettings = Hl7Notifier | FhirNotifier | WebhookNotifier
#: Sends one notification: the receiver's answer (ACK code, HTTP status) when accepted;
#: raises Refused or Unreachable.
Sender = Callable[[NotificationFacts, Any, datetime, NotifySettings], str]


def _send_hl7(facts: NotificationFacts, n: Any, now: datetime, s: NotifySettings) -> str:
    from pacs_agent.notify.hl7 import deliver_hl7

    return deliver_hl7(facts, n, now, s.timeout_s)


def _send_fhir(facts: NotificationFacts, n: Any, now: datetime, s: NotifySettings) -> str:
    from pacs_agent.notify.fhir import deliver_fhir

    return deliver_fhir(facts, n, now, s.timeout_s)


def _send_webhook(facts: NotificationFacts, n: Any, now: datetime, s: NotifySettings) -> str:
    from pacs_agent.notify.webhook import deliver_webhook

    return deliver_webhook(facts, n, now, s.timeout_s)


SENDERS: Mapping[str, Sender] = {"hl7": _send_hl7, "fhir": _send_fhir, "webhook": _send_webhook}


def create_notifications(
    session: Session, settings: NotifySettings, job_id: int, event: str, now: datetime
) -> int:
    """Make (in the caller's transaction) one ``pending`` row per notifier that wants
    ``event`` for the job; a row that already exists starts again (attempts 0). Returns how
    many rows are due."""
    made = 0
    for notifier in settings.notifiers:
        if event not in notifier.events:
            continue
        existing = session.scalars(
            select(Notification).where(
                Notification.job_id == job_id,
                Notification.notifier == notifier.name,
                Notification.event == event,
            )
        ).first()
        if existing is None:
            session.add(
                Notification(
                    job_id=job_id,
                    notifier=notifier.name,
                    kind=notifier.kind,
                    event=event,
                    state=PENDING,
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                    next_attempt_at=now,
                )
            )
        else:
            existing.state = PENDING
            existing.attempts = 0
            existing.next_attempt_at = now
            existing.updated_at = now
        made += 1
    return made


def _move(
    session: Session,
    notification_id: int,
    sources: Iterable[str],
    *where: ColumnElement[bool],
    **values: Any,
) -> bool:
    """A conditional update: True when the row was in one of ``sources`` (and ``where``)."""
    result = session.execute(
        update(Notification)
        .where(Notification.id == notification_id, Notification.state.in_(list(sources)), *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def dispatch_due(
    session_factory: sessionmaker[Session],
    send: Callable[[int], None],
    now: datetime,
    stale_after_s: float,
    limit: int = 100,
) -> int:
    """Hand the due ``pending`` rows to the broker (``send(id)``), after marking them
    ``queued``; send again rows ``queued`` for longer than ``stale_after_s`` (a lost
    message) and take back rows ``sending`` that long (a dead worker). Returns how many
    were sent. A broker that refuses leaves the row ``pending`` for the next sweep."""
    stale = now - timedelta(seconds=stale_after_s)
    is_due = ((Notification.state == PENDING) & (Notification.next_attempt_at <= now)) | (
        Notification.state.in_([QUEUED, SENDING]) & (Notification.updated_at < stale)
    )
    with read_session(session_factory) as session:
        due = list(
            session.scalars(
                select(Notification.id)
                .where(is_due)
                .order_by(Notification.next_attempt_at, Notification.id)
                .limit(limit)
            )
        )
    sent = 0
    for notification_id in due:
        with session_factory.begin() as session:
            # Checked again in the update: a worker may have taken the row meanwhile.
            if not _move(
                session,
                notification_id,
                [PENDING, QUEUED, SENDING],
                is_due,
                state=QUEUED,
                updated_at=now,
            ):
                continue
        try:
            send(notification_id)
            sent += 1
        except Exception as exc:
            log.warning("notification %d: broker unavailable (%s)", notification_id, exc)
            with session_factory.begin() as session:
                _move(session, notification_id, [QUEUED], state=PENDING, updated_at=now)
            break
    return sent


def _notifier(settings: Settings, name: str) -> NotifierSettings | None:
    return next((n for n in settings.notify.notifiers if n.name == name), None)


def _policy(settings: NotifySettings, notifier: NotifierSettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=notifier.max_attempts or settings.max_attempts,
        initial_s=settings.backoff_initial_s,
        factor=settings.backoff_factor,
        max_s=settings.backoff_max_s,
    )


def deliver(
    settings: Settings,
    session_factory: sessionmaker[Session],
    notification_id: int,
    *,
    senders: Mapping[str, Sender] = SENDERS,
    now: Callable[[], datetime] = utcnow,
) -> str:
    """One attempt at one notification (the io task's body); returns its new state, or
    ``skipped`` when the row is not ``queued``/``pending`` (sent already, or held by another
    worker). Every outcome is written to the row: sent; pending again after a backoff
    (receiver unreachable, attempts left); failed with the error (refused, attempts spent,
    notifier no longer configured)."""
    started = now()
    with session_factory.begin() as session:
        if not _move(
            session,
            notification_id,
            [QUEUED, PENDING],
            state=SENDING,
            attempts=Notification.attempts + 1,
            updated_at=started,
        ):
            return "skipped"
        row = session.get(Notification, notification_id)
        assert row is not None
        name, kind, attempts = row.notifier, row.kind, row.attempts
    notifier = _notifier(settings, name)
    if notifier is None or notifier.kind != kind:
        return _finish(
            session_factory,
            notification_id,
            FAILED,
            now(),
            error=f"notifier {name!r} ({kind}) is not in the settings any more",
        )
    with session_factory() as session:
        facts = load_facts(session, notification_id, settings.spool_dir)
    if facts is None:
        return _finish(session_factory, notification_id, FAILED, now(), error="job is gone")
    try:
        answer = senders[kind](facts, notifier, started, settings.notify)
    except Refused as exc:
        log.warning(
            "notification %d (job %d, %s to %s): refused (%s)",
            notification_id,
            facts.job_id,
            facts.event,
            name,
            exc.response or "no code",
        )
        return _finish(
            session_factory, notification_id, FAILED, now(), error=str(exc), response=exc.response
        )
    except (Unreachable, OSError) as exc:
        response = exc.response if isinstance(exc, Unreachable) else None
        wait = backoff_s(_policy(settings.notify, notifier), attempts)
        error = str(exc) or type(exc).__name__
        # An HTTP answer's body may echo the payload: the log names only its status.
        logged = f"HTTP {response}" if response and response.isdigit() else error
        if wait is None:
            log.warning(
                "notification %d (job %d, %s to %s): %d attempt(s), giving up: %s",
                notification_id,
                facts.job_id,
                facts.event,
                name,
                attempts,
                logged,
            )
            return _finish(
                session_factory,
                notification_id,
                FAILED,
                now(),
                error=f"{attempts} attempt(s), last error: {error}",
                response=response,
            )
        log.warning(
            "notification %d (job %d, %s to %s): attempt %d failed (%s); again in %.1f s",
            notification_id,
            facts.job_id,
            facts.event,
            name,
            attempts,
            logged,
            wait,
        )
        at = now()
        return _finish(
            session_factory,
            notification_id,
            PENDING,
            at,
            error=error,
            response=response,
            next_attempt_at=at + timedelta(seconds=wait),
        )
    except Exception as exc:  # a message that cannot be built: visible, never retried blindly
        log.error(
            "notification %d (job %d): cannot be built (%s)",
            notification_id,
            facts.job_id,
            type(exc).__name__,
        )
        return _finish(
            session_factory,
            notification_id,
            FAILED,
            now(),
            error=f"cannot build the message: {type(exc).__name__}: {exc}"[:2000],
        )
    log.info(
        "notification %d (job %d, %s to %s): sent (%s)",
        notification_id,
        facts.job_id,
        facts.event,
        name,
        answer,
    )
    done = now()
    return _finish(
        session_factory, notification_id, SENT, done, response=answer, sent_at=done, error=None
    )


def _finish(
    session_factory: sessionmaker[Session],
    notification_id: int,
    state: str,
    at: datetime,
    *,
    error: str | None,
    **values: Any,
) -> str:
    with session_factory.begin() as session:
        _move(
            session,
            notification_id,
            [SENDING],
            state=state,
            updated_at=at,
            last_error=error[:2000] if error else None,
            **values,
        )
    return state


@dataclass(frozen=True)
class RetryResult:
    moved: list[int]
    unchanged: list[tuple[int, str]]


def retry_notifications(
    session: Session, ids: Iterable[int], now: datetime, *, include_sent: bool = False
) -> RetryResult:
    """Send again (in the caller's transaction): ``failed`` rows (and ``sent`` ones with
    ``include_sent``) become ``pending``, due now, attempts 0. Others are left as they are,
    with the reason."""
    sources = [FAILED, SENT] if include_sent else [FAILED]
    moved: list[int] = []
    unchanged: list[tuple[int, str]] = []
    for notification_id in ids:
        if _move(
            session,
            notification_id,
            sources,
            state=PENDING,
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
        ):
            moved.append(notification_id)
            continue
        row = session.get(Notification, notification_id)
        unchanged.append(
            (notification_id, "no such notification" if row is None else f"it is {row.state}")
        )
    return RetryResult(moved, unchanged)


def list_notifications(
    session: Session,
    *,
    states: Iterable[str] = (),
    job_id: int | None = None,
    notifier: str | None = None,
    limit: int = 200,
) -> list[Notification]:
    """Newest first."""
    q = select(Notification).order_by(Notification.id.desc()).limit(limit)
    states = list(states)
    if states:
        q = q.where(Notification.state.in_(states))
    if job_id is not None:
        q = q.where(Notification.job_id == job_id)
    if notifier is not None:
        q = q.where(Notification.notifier == notifier)
    return list(session.scalars(q))


def as_json(n: Notification) -> dict[str, Any]:
    def iso(v: datetime | None) -> str | None:
        return v.isoformat() if v is not None else None

    return {
        "id": n.id,
        "job_id": n.job_id,
        "notifier": n.notifier,
        "kind": n.kind,
        "event": n.event,
        "state": n.state,
        "attempts": n.attempts,
        "last_error": n.last_error,
        "response": n.response,
        "created_at": iso(n.created_at),
        "updated_at": iso(n.updated_at),
        "next_attempt_at": iso(n.next_attempt_at),
        "sent_at": iso(n.sent_at),
    }
