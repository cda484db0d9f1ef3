"""The job state machine (DESIGN: job states)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    EXPORTING = "exporting"
    EXPORTED = "exported"
    FAILED = "failed"
    EXPORT_FAILED = "export_failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


S = JobStatus

#: Allowed transitions. Every change of a job's status goes through a conditional update
#: ``WHERE status IN (allowed sources)``, so two workers can never both take one job.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.PENDING: frozenset({S.QUEUED, S.CANCELLED, S.SUPERSEDED}),
    S.QUEUED: frozenset({S.RUNNING, S.QUEUED, S.PENDING, S.CANCELLED, S.SUPERSEDED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset({S.EXPORTING, S.SUPERSEDED}),
    S.EXPORTING: frozenset({S.EXPORTED, S.EXPORT_FAILED, S.EXPORTING}),
    S.EXPORTED: frozenset({S.EXPORTING, S.SUPERSEDED}),
    S.FAILED: frozenset({S.PENDING, S.QUEUED, S.CANCELLED, S.SUPERSEDED}),
    S.EXPORT_FAILED: frozenset({S.EXPORTING, S.CANCELLED, S.SUPERSEDED}),
    S.CANCELLED: frozenset({S.QUEUED}),
    S.SUPERSEDED: frozenset(),
}

TERMINAL = frozenset({S.EXPORTED, S.FAILED, S.EXPORT_FAILED, S.CANCELLED, S.SUPERSEDED})


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The states from which ``target`` may be entered."""
    return frozenset(src for src, dsts in TRANSITIONS.items() if target in dsts)


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


class TransientError(Exception):
    """A failure worth retrying (a resource briefly unavailable); raise it to ask for a retry."""


def retry_delay(attempts: int, max_attempts: int, base_s: float, max_s: float) -> float | None:
    """Seconds to wait before trying again after ``attempts`` tries, or None when none are left.

    Exponential backoff: ``base_s``, ``2 * base_s``, ``4 * base_s``, ... capped at ``max_s``.
    """
    if attempts >= max_attempts:
        return None
    return float(min(max_s, base_s * 2 ** max(0, attempts - 1)))
