"""Retention decisions (pure, the clock passed in), a study's AI state, and how a C-MOVE
outcome is explained to an administrator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pacs_agent.domain.jobs import JobStatus as S
from pacs_agent.domain.retention import (
    AIStatus,
    PurgePolicy,
    StudyActivity,
    ai_status,
    purge_decision,
)
from pacs_agent.net.qr import MoveOutcome
from pacs_agent.retrieve import RetrievedStudy, RetrieveReport, judge

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
THIRTY_DAYS = PurgePolicy(older_than=timedelta(days=30))


def study(days_idle: float, status: str = "complete", *jobs: S) -> StudyActivity:
    return StudyActivity("1.2.3", status, NOW - timedelta(days=days_idle), tuple(jobs))


def test_a_study_idle_longer_than_the_retention_goes() -> None:
    d = purge_decision(study(31, "complete", S.EXPORTED), THIRTY_DAYS, NOW)
    assert d.purge and "31.0 days" in d.why


def test_a_study_active_within_the_retention_stays_and_says_when_it_was_active() -> None:
    d = purge_decision(study(29.5, "complete", S.EXPORTED), THIRTY_DAYS, NOW)
    assert not d.purge and d.why == "active 29.5 days ago, kept 30.0 days"


def test_exactly_at_the_limit_goes() -> None:
    assert purge_decision(study(30), THIRTY_DAYS, NOW).purge


def test_a_study_with_a_job_in_flight_never_goes_however_old() -> None:
    for busy in (S.PENDING, S.QUEUED, S.RUNNING, S.EXPORTING):
        d = purge_decision(study(400, "complete", S.EXPORTED, busy), THIRTY_DAYS, NOW)
        assert not d.purge and d.why == f"a job is in flight ({busy.value})"
        named = PurgePolicy(study_uids=frozenset({"1.2.3"}))
        assert not purge_decision(study(0, "complete", busy), named, NOW).purge


def test_finished_failed_cancelled_and_superseded_jobs_do_not_hold_a_study() -> None:
    jobs = (S.FAILED, S.EXPORT_FAILED, S.CANCELLED, S.SUPERSEDED, S.SUCCEEDED)
    assert purge_decision(study(60, "complete", *jobs), THIRTY_DAYS, NOW).purge


def test_a_study_still_receiving_never_goes() -> None:
    d = purge_decision(study(90, "receiving"), THIRTY_DAYS, NOW)
    assert not d.purge and d.why == "still receiving instances"


def test_a_named_study_goes_whatever_its_age() -> None:
    named = PurgePolicy(study_uids=frozenset({"1.2.3"}))
    assert purge_decision(study(0), named, NOW).purge
    other = PurgePolicy(study_uids=frozenset({"9.9"}))
    assert purge_decision(study(0), other, NOW).why == "not selected"


def test_a_study_an_earlier_purge_started_on_is_always_finished() -> None:
    d = purge_decision(study(0, "purging"), PurgePolicy(older_than=timedelta(days=365)), NOW)
    assert d.purge and "finishing" in d.why


def test_the_decision_follows_the_clock_passed_in() -> None:
    s = study(10)
    assert not purge_decision(s, THIRTY_DAYS, NOW).purge
    assert purge_decision(s, THIRTY_DAYS, NOW + timedelta(days=20)).purge


def test_ai_status_of_a_study_from_its_jobs() -> None:
    assert ai_status([]) is AIStatus.NONE
    assert ai_status([S.SUPERSEDED, S.CANCELLED]) is AIStatus.NONE
    assert ai_status([S.EXPORTED, S.RUNNING]) is AIStatus.IN_PROGRESS
    assert ai_status([S.EXPORTED, S.EXPORT_FAILED]) is AIStatus.FAILED
    assert ai_status([S.EXPORTED, "succeeded", S.SUPERSEDED]) is AIStatus.DONE


def test_move_outcomes_are_explained_with_their_counts() -> None:
    assert MoveOutcome(0, completed=12).explain() == (
        "C-MOVE success: 12 sent, 0 failed, 0 with warnings"
    )
    unknown = MoveOutcome(0xA801).explain()
    assert "0xA801" in unknown and "move destination unknown" in unknown
    partial = MoveOutcome(0xB000, completed=12, failed=1)
    assert not partial.ok and "partly failed" in partial.explain()
    assert "1 failed" in partial.explain()
    assert "no final C-MOVE response" in MoveOutcome(None).explain()
    assert "unable to process" in MoveOutcome(0xC001, completed=3, failed=2).explain()


def test_a_retrieve_is_judged_by_what_arrived_not_only_by_the_pacs_counts() -> None:
    assert judge(MoveOutcome(0, completed=9), 9, 9, 9, "AGENT")[0] == "ok"
    # Held already (identical copies are not new): still ok.
    assert judge(MoveOutcome(0, completed=9), 9, 0, 9, "AGENT")[0] == "ok"
    # Orthanc stops at a refused sub-operation with 0xC000 and no counts: 8 of 9 here.
    state, text = judge(MoveOutcome(0xC000), 9, 8, 8, "AGENT")
    assert state == "partial" and "status 0xC000" in text
    assert "only 8 arrived, 8 of 9 held here" in text
    state, text = judge(MoveOutcome(0xB000, completed=8, failed=1), 9, 8, 8, "AGENT")
    assert state == "partial" and "1 failed" in text
    # Nothing arrived and a failure: the likely cause is named.
    state, text = judge(MoveOutcome(0xC000), 9, 0, 7, "NOBODY")
    assert state == "failed" and "does not know the move destination NOBODY" in text
    state, text = judge(MoveOutcome(0xA801), None, 0, 0, "NOBODY")
    assert state == "failed" and "move destination unknown" in text
    # Success claimed, but fewer here than the PACS counted: partial.
    assert judge(MoveOutcome(0, completed=9), 9, 7, 7, "AGENT")[0] == "partial"


def test_a_retrieve_whose_studies_were_already_here_is_partial_not_nothing() -> None:
    """Asked again for an accession: one study already whole here (nothing new arrived), the
    other refused. Something of the request is here, so partial (exit 1), not "nothing"."""
    whole = RetrievedStudy("1.2.3", "A1", MoveOutcome(0x0000), 8, 0, 8, "ok")
    refused = RetrievedStudy("1.2.4", "A1", MoveOutcome(0xC000), 1, 0, 0, "failed")
    report = RetrieveReport("PACSAGENT", [whole, refused])
    assert not report.all_ok and report.any_sent
    assert not RetrieveReport("PACSAGENT", [refused]).any_sent
