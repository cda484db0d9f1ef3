"""Retention: which studies a purge may remove, and what a study's AI state is (pure).

Both are decisions with the clock passed in (DESIGN invariant 5): the purge command gathers
the facts of each study from the database and asks :func:`purge_decision`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pacs_agent.domain.jobs import JobStatus

#: Jobs in these states still need the study's files; a purge never removes such a study.
IN_FLIGHT = frozenset({JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.EXPORTING})

#: A study a purge has started on (files going, rows next); a re-run finishes it.
PURGING = "purging"


class AIStatus(StrEnum):
    """A study's AI state, derived from its jobs (superseded and cancelled ones ignored)."""

    NONE = "none"  # no job (no rule selected a model, or still receiving)
    IN_PROGRESS = "in_progress"  # a job is pending, queued, running or exporting
    FAILED = "failed"  # nothing in progress, and a job failed or its export failed
    DONE = "done"  # every job succeeded (and was exported where destinations exist)


def ai_status(job_statuses: Iterable[JobStatus | str]) -> AIStatus:
    """The AI state of a study whose jobs are in ``job_statuses``."""
    live = [
        JobStatus(s)
        for s in job_statuses
        if JobStatus(s) not in (JobStatus.SUPERSEDED, JobStatus.CANCELLED)
    ]
    if not live:
        return AIStatus.NONE
    if any(s in IN_FLIGHT for s in live):
        return AIStatus.IN_PROGRESS
    if any(s in (JobStatus.FAILED, JobStatus.EXPORT_FAILED) for s in live):
        return AIStatus.FAILED
    return AIStatus.DONE


@dataclass(frozen=True)
class StudyActivity:
    """What a purge needs to know about one study."""

    study_instance_uid: str
    #: The study row's status: receiving, complete or purging.
    status: str
    #: The latest of: last instance received, completion, any job's last change, any export.
    last_activity: datetime
    job_statuses: tuple[JobStatus, ...] = ()


@dataclass(frozen=True)
class PurgePolicy:
    """Which studies to purge: those idle for ``older_than`` and/or named by UID.

    Both empty selects nothing. With both, a study matches either.
    """

    older_than: timedelta | None = None
    study_uids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PurgeDecision:
    purge: bool
    why: str


def purge_decision(study: StudyActivity, policy: PurgePolicy, now: datetime) -> PurgeDecision:
    """Whether ``study`` goes, and why (or why not).

    A study a purge already started on (status ``purging``) always goes: a re-run after a
    crash finishes it. A study still receiving, or with a job in flight, never goes.
    """
    if study.status == PURGING:
        return PurgeDecision(True, "an earlier purge started on it; finishing")
    named = study.study_instance_uid in policy.study_uids
    old = policy.older_than is not None and study.last_activity <= now - policy.older_than
    if not (named or old):
        if policy.older_than is not None and not policy.study_uids:
            idle = now - study.last_activity
            return PurgeDecision(
                False, f"active {_days(idle)} ago, kept {_days(policy.older_than)}"
            )
        return PurgeDecision(False, "not selected")
    if study.status == "receiving":
        return PurgeDecision(False, "still receiving instances")
    busy = sorted({s.value for s in study.job_statuses if s in IN_FLIGHT})
    if busy:
        return PurgeDecision(False, f"a job is in flight ({', '.join(busy)})")
    if named:
        return PurgeDecision(True, "named")
    return PurgeDecision(True, f"no activity for {_days(now - study.last_activity)}")


def _days(t: timedelta) -> str:
    return f"{t.total_seconds() / 86400:.1f} days"
