"""Unified Procedure Steps (PS3.4 Annex CC) as a view of the job table (IHE AIW-I).

Pure: a workitem's Procedure Step State and progress are derived from job states; the
database's job rows stay the truth. The UPS states are final once COMPLETED or CANCELED
(PS3.4 CC.1.1): a later change of the job (an administrator's retry) never reopens them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pacs_agent.domain.jobs import JobStatus


class ProcedureStepState(StrEnum):
    """Procedure Step State (0074,1000): DICOM's own values."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"


UPS = ProcedureStepState
FINAL = frozenset({UPS.COMPLETED, UPS.CANCELED})


@dataclass(frozen=True)
class StepState:
    """A workitem's state, its progress (0-100) and, for CANCELED, the reason."""

    state: ProcedureStepState
    progress: int
    reason: str = ""


_J = JobStatus
#: How far along a job is, in percent, in each state that is not final.
_PROGRESS = {
    _J.PENDING: 0,
    _J.QUEUED: 0,
    _J.RUNNING: 20,
    _J.SUCCEEDED: 70,
    _J.EXPORTING: 85,
    _J.EXPORTED: 100,
}


def job_step_state(status: JobStatus, reason: str | None = None) -> StepState:
    """The UPS state of one AI job.

    pending, queued: SCHEDULED; running, succeeded, exporting: IN PROGRESS (results are
    part of the step: COMPLETED means the SEG and SR are in the PACS); exported: COMPLETED;
    failed, export_failed, cancelled, superseded: CANCELED with the job's reason.
    """
    if status in (_J.PENDING, _J.QUEUED):
        return StepState(UPS.SCHEDULED, 0)
    if status in (_J.RUNNING, _J.SUCCEEDED, _J.EXPORTING):
        return StepState(UPS.IN_PROGRESS, _PROGRESS[status])
    if status == _J.EXPORTED:
        return StepState(UPS.COMPLETED, 100)
    return StepState(UPS.CANCELED, 0, reason or f"job {status.value}")


def study_step_state(jobs: Iterable[tuple[JobStatus, str | None]]) -> StepState:
    """The UPS state of a requested workitem ("process this study") from its study's jobs,
    given as (status, reason) pairs.

    Superseded jobs are left out (a newer job replaced each). No job: SCHEDULED. Any job not
    final: SCHEDULED while none has started, else IN PROGRESS with the mean progress (below
    100). All final: COMPLETED if every job completed, else CANCELED with the first reason.
    """
    states = [job_step_state(s, r) for s, r in jobs if s != JobStatus.SUPERSEDED]
    if not states:
        return StepState(UPS.SCHEDULED, 0)
    if any(s.state not in FINAL for s in states):
        if all(s.state == UPS.SCHEDULED for s in states):
            return StepState(UPS.SCHEDULED, 0)
        progress = sum(100 if s.state in FINAL else s.progress for s in states) // len(states)
        return StepState(UPS.IN_PROGRESS, min(progress, 99))
    failed = [s for s in states if s.state == UPS.CANCELED]
    if not failed:
        return StepState(UPS.COMPLETED, 100)
    return StepState(UPS.CANCELED, 0, failed[0].reason)


def next_report(previous: StepState | None, current: StepState) -> StepState:
    """What a workitem now is, given what was last reported: a final state never changes."""
    if previous is not None and previous.state in FINAL:
        return previous
    return current


def state_reports(previous: StepState | None, current: StepState) -> list[StepState]:
    """The UPS State Reports owed to subscribers going from ``previous`` to ``current``.

    PS3.4 CC.1.1 allows SCHEDULED -> IN PROGRESS -> COMPLETED and SCHEDULED or IN PROGRESS
    -> CANCELED; a job seen going from SCHEDULED straight to COMPLETED (it ran between two
    looks) is reported through IN PROGRESS, so a subscriber sees every state the standard
    requires. Nothing when the state did not change; progress alone is a Progress Report.
    """
    if previous is not None and (previous.state in FINAL or previous.state == current.state):
        return []
    reports: list[StepState] = []
    was = previous.state if previous is not None else None
    if current.state == UPS.COMPLETED and was in (None, UPS.SCHEDULED):
        reports.append(StepState(UPS.IN_PROGRESS, 0))
    reports.append(current)
    return reports
