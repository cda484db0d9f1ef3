"""The worklist's study flag is the notifiers' flag: the highest recorded with its current jobs."""

from __future__ import annotations

from typing import Any

from pacs_agent.db.queries import study_flag


def _job(job_id: int, status: str, ai_flag: str | None) -> dict[str, Any]:
    return {"id": job_id, "status": status, "ai_flag": ai_flag}


def _finding(job_id: int, flag: bool) -> dict[str, Any]:
    return {"job_id": job_id, "flag": flag}


def test_the_highest_flag_of_the_current_jobs_is_the_studys() -> None:
    jobs = [_job(1, "exported", "positive"), _job(2, "succeeded", "critical")]
    assert study_flag(jobs, []) == "critical"


def test_superseded_and_cancelled_jobs_do_not_flag_the_study() -> None:
    jobs = [
        _job(1, "superseded", "critical"),
        _job(2, "cancelled", "positive"),
        _job(3, "exported", "none"),
    ]
    assert study_flag(jobs, [_finding(1, True)]) == "none"


def test_a_job_from_before_flags_were_recorded_is_positive_when_a_finding_is_flagged() -> None:
    jobs = [_job(1, "exported", None), _job(2, "exported", None)]
    assert study_flag(jobs, [_finding(1, False), _finding(2, True)]) == "positive"
    assert study_flag(jobs, [_finding(1, False)]) == "none"
