"""The UPS outbox on a real SQLite database: each job transition a subscriber must hear of is
recorded once, in order; final states stay final; an undelivered event waits its turn."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent import ups
from pacs_agent.config import Settings
from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Base, Job, Series, Study, UpsEvent, UpsWorkitem
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.domain.jobs import JobStatus

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
ROOT = "1.2.826.0.1.3680043.10.999"


def _site(tmp_path: Path) -> tuple[Settings, sessionmaker[Session], int]:
    settings = Settings(
        data_dir=tmp_path / "var",
        ups={"subscribers": [{"ae_title": "RIS", "host": "127.0.0.1", "port": 104}]},
    )
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    sf = make_session_factory(engine)
    with sf.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.3.4")
        s.add(series)
        s.flush()
        job = Job(study_id=study.id, series_id=series.id, model_name="m", status="queued")
        s.add(job)
        s.flush()
        job_id = job.id
    return settings, sf, job_id


def _move(sf: sessionmaker[Session], job_id: int, to: JobStatus) -> None:
    with sf.begin() as s:
        assert transition(s, job_id, to)


def _events(sf: sessionmaker[Session]) -> list[tuple[int, str, int]]:
    with sf() as s:
        return [
            (e.event_type, e.state, e.progress)
            for e in s.scalars(select(UpsEvent).order_by(UpsEvent.id))
        ]


def test_a_global_subscriber_is_owed_every_state_and_progress_change_once(tmp_path: Path) -> None:
    settings, sf, job_id = _site(tmp_path)
    assert ups.subscribe(sf, settings, ups.GLOBAL, "RIS", False, T0) == 0
    ups.refresh(sf, ROOT, T0)
    ups.refresh(sf, ROOT, T0 + timedelta(seconds=1))  # nothing changed: nothing owed
    assert _events(sf) == [(1, "SCHEDULED", 0)]
    _move(sf, job_id, JobStatus.RUNNING)
    ups.refresh(sf, ROOT, T0)
    _move(sf, job_id, JobStatus.SUCCEEDED)
    ups.refresh(sf, ROOT, T0)
    _move(sf, job_id, JobStatus.EXPORTING)
    _move(sf, job_id, JobStatus.EXPORTED)
    ups.refresh(sf, ROOT, T0)
    # An administrator exports again: the workitem stays COMPLETED, nothing more is owed.
    _move(sf, job_id, JobStatus.EXPORTING)
    ups.refresh(sf, ROOT, T0)
    assert _events(sf) == [
        (1, "SCHEDULED", 0),
        (1, "IN PROGRESS", 20),
        (3, "IN PROGRESS", 70),
        (1, "COMPLETED", 100),
    ]


def test_a_job_that_finished_between_two_looks_is_reported_through_in_progress(
    tmp_path: Path,
) -> None:
    settings, sf, job_id = _site(tmp_path)
    ups.refresh(sf, ROOT, T0)  # the workitem exists before anyone subscribes
    assert ups.subscribe(sf, settings, ups.GLOBAL, "RIS", False, T0) == 0
    for to in (JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.EXPORTING, JobStatus.EXPORTED):
        _move(sf, job_id, to)
    ups.refresh(sf, ROOT, T0)
    assert [(k, s) for k, s, _ in _events(sf)] == [
        (1, "SCHEDULED"),  # the current state, sent on subscribing
        (1, "IN PROGRESS"),
        (1, "COMPLETED"),
    ]


def test_an_event_not_delivered_holds_back_the_later_ones_of_its_subscriber(
    tmp_path: Path,
) -> None:
    settings, sf, job_id = _site(tmp_path)
    ups.subscribe(sf, settings, ups.GLOBAL, "RIS", False, T0)
    ups.refresh(sf, ROOT, T0)
    _move(sf, job_id, JobStatus.CANCELLED)
    ups.refresh(sf, ROOT, T0)
    with sf() as s:
        pending = ups.pending_events(s, T0)["RIS"]
    assert [p.state for p in pending] == ["SCHEDULED", "CANCELED"]
    retry_at = ups.mark_failed(sf, pending[0].id, "association failed", settings, T0)
    assert retry_at == T0 + timedelta(seconds=settings.ups.retry_initial_s)
    with sf() as s:
        assert ups.pending_events(s, T0) == {}  # the first is not due: none is sent
        later = ups.pending_events(s, retry_at)["RIS"]
    assert [p.state for p in later] == ["SCHEDULED", "CANCELED"]
    assert later[0].attempts == 1


def test_only_a_requested_scheduled_workitem_for_a_study_not_held_awaits_a_retrieve_and_a_failure_ends_it_canceled(  # noqa: E501
    tmp_path: Path,
) -> None:
    settings, sf, _ = _site(tmp_path)
    assert ups.subscribe(sf, settings, ups.GLOBAL, "RIS", False, T0) == 0
    with sf.begin() as s:  # a request for the study held here (1.2.3): no retrieve
        s.add(
            UpsWorkitem(
                sop_instance_uid="2.25.1",
                study_instance_uid="1.2.3",
                requested_by="RIS",
                state="SCHEDULED",
                progress=0,
                created_at=T0,
                updated_at=T0,
            )
        )
    ups.refresh(sf, ROOT, T0)  # the job's own workitem: never retrieved either
    request = Dataset()
    request.ProcedureStepState = "SCHEDULED"
    request.StudyInstanceUID = "9.9.9"
    absent = ups.create_requested(sf, settings, "2.25.2", request.copy(), "RIS", T0)
    cancelled = ups.create_requested(sf, settings, "2.25.3", request.copy(), "RIS", T0)
    assert ups.request_cancel(sf, cancelled, "RIS", T0) == 0
    with sf() as s:
        assert ups.awaiting_retrieve(s) == [absent]

    assert ups.end_requested(sf, absent, "retrieve from the PACS failed: not there", T0)
    assert not ups.end_requested(sf, absent, "again", T0)  # final stays final
    with sf() as s:
        assert ups.awaiting_retrieve(s) == []
        item = ups.find_workitem(s, absent)
        assert item is not None
        assert (item.state, item.reason) == ("CANCELED", "retrieve from the PACS failed: not there")
        owed = [
            (e.event_type, e.state, e.reason)
            for e in s.scalars(select(UpsEvent).where(UpsEvent.workitem_uid == absent))
        ]
    assert owed == [
        (1, "SCHEDULED", None),
        (1, "CANCELED", "retrieve from the PACS failed: not there"),
    ]
