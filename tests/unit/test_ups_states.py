"""Job states as Unified Procedure Step states (pure, domain.ups) and the workitem UID."""

from __future__ import annotations

import pytest

from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.uids import workitem_uid
from pacs_agent.domain.ups import (
    UPS,
    StepState,
    job_step_state,
    next_report,
    state_reports,
    study_step_state,
)

J = JobStatus


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (J.PENDING, UPS.SCHEDULED),
        (J.QUEUED, UPS.SCHEDULED),
        (J.RUNNING, UPS.IN_PROGRESS),
        (J.SUCCEEDED, UPS.IN_PROGRESS),
        (J.EXPORTING, UPS.IN_PROGRESS),
        (J.EXPORTED, UPS.COMPLETED),
        (J.FAILED, UPS.CANCELED),
        (J.EXPORT_FAILED, UPS.CANCELED),
        (J.CANCELLED, UPS.CANCELED),
        (J.SUPERSEDED, UPS.CANCELED),
    ],
)
def test_every_job_status_maps_to_a_procedure_step_state(status: JobStatus, state: UPS) -> None:
    assert job_step_state(status).state == state


def test_progress_grows_along_the_job_and_is_100_only_when_results_are_in_the_pacs() -> None:
    path = [J.QUEUED, J.RUNNING, J.SUCCEEDED, J.EXPORTING, J.EXPORTED]
    progress = [job_step_state(s).progress for s in path]
    assert progress == sorted(progress)
    assert progress[-1] == 100
    assert all(p < 100 for p in progress[:-1])


def test_a_canceled_step_keeps_the_jobs_reason() -> None:
    assert job_step_state(J.FAILED, "model crashed").reason == "model crashed"
    assert job_step_state(J.CANCELLED).reason == "job cancelled"


def test_a_requested_study_is_scheduled_until_a_job_starts_and_completed_when_all_are() -> None:
    assert study_step_state([]).state == UPS.SCHEDULED
    assert study_step_state([(J.QUEUED, None)]).state == UPS.SCHEDULED
    mid = study_step_state([(J.RUNNING, None), (J.EXPORTED, None)])
    assert mid.state == UPS.IN_PROGRESS
    assert 0 < mid.progress < 100
    assert study_step_state([(J.EXPORTED, None), (J.SUPERSEDED, None)]).state == UPS.COMPLETED
    failed = study_step_state([(J.EXPORTED, None), (J.FAILED, "no GPU")])
    assert (failed.state, failed.reason) == (UPS.CANCELED, "no GPU")


def test_a_final_state_is_never_left_even_when_the_job_is_retried() -> None:
    done = StepState(UPS.CANCELED, 0, "failed")
    assert next_report(done, StepState(UPS.SCHEDULED, 0)) == done
    assert state_reports(done, StepState(UPS.IN_PROGRESS, 20)) == []


def test_a_job_that_ran_between_two_looks_is_reported_through_in_progress() -> None:
    reports = state_reports(StepState(UPS.SCHEDULED, 0), StepState(UPS.COMPLETED, 100))
    assert [r.state for r in reports] == [UPS.IN_PROGRESS, UPS.COMPLETED]
    cancel = state_reports(StepState(UPS.SCHEDULED, 0), StepState(UPS.CANCELED, 0, "x"))
    assert [r.state for r in cancel] == [UPS.CANCELED]
    assert state_reports(StepState(UPS.IN_PROGRESS, 20), StepState(UPS.IN_PROGRESS, 70)) == []


def test_a_jobs_workitem_uid_is_stable_and_differs_between_jobs() -> None:
    a = workitem_uid("1.2.3", "1.2.3.4", "1.2.3.4.5", "spleen", 1)
    assert a == workitem_uid("1.2.3", "1.2.3.4", "1.2.3.4.5", "spleen", 1)
    assert a != workitem_uid("1.2.3", "1.2.3.4", "1.2.3.4.5", "spleen", 2)
    assert a.startswith("1.2.3.") and len(a) <= 64


def test_the_ups_scp_cannot_be_enabled_without_its_clients_known() -> None:
    from pydantic import ValidationError

    from pacs_agent.config import UpsSettings

    with pytest.raises(ValidationError, match=r"ups\.enabled needs ups\.subscribers"):
        UpsSettings(enabled=True)
    with pytest.raises(ValidationError, match="must be unique"):
        UpsSettings(
            subscribers=[
                {"ae_title": "RIS", "host": "127.0.0.1", "port": 104},
                {"ae_title": "RIS", "host": "127.0.0.2", "port": 104},
            ]
        )
    ok = UpsSettings(
        enabled=True, subscribers=[{"ae_title": "RIS", "host": "10.0.0.1", "port": 104}]
    )
    assert ok.port == 11113
