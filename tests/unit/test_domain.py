from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_agent.domain.completeness import (
    CompletenessPolicy,
    Completion,
    StudyArrival,
    is_complete,
)
from pacs_agent.domain.jobs import JobStatus, can_transition, sources_of
from pacs_agent.domain.routing import Rule, SeriesFacts, rule_rejects, select_models
from pacs_agent.domain.uids import derive_uid, device_uid, job_result_uids, validate_uid_root

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
POLICY = CompletenessPolicy(idle_timeout_s=3, unreleased_timeout_s=60, max_wait_s=600)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_study_waits_while_association_is_open_and_instances_keep_coming() -> None:
    state = StudyArrival(first_received_at=T0, last_received_at=at(10), last_released_at=None)
    assert is_complete(state, POLICY, at(15)) is Completion.WAITING


def test_study_completes_idle_timeout_after_release() -> None:
    state = StudyArrival(T0, at(10), last_released_at=at(10.5))
    assert is_complete(state, POLICY, at(12)) is Completion.WAITING
    assert is_complete(state, POLICY, at(13)) is Completion.RELEASED_AND_IDLE


def test_release_before_a_later_instance_does_not_count() -> None:
    # Released at 5, then another association sent more at 10 and is still open.
    state = StudyArrival(T0, at(10), last_released_at=at(5))
    assert is_complete(state, POLICY, at(20)) is Completion.WAITING


def test_never_released_study_completes_after_unreleased_timeout() -> None:
    state = StudyArrival(T0, at(10), last_released_at=None)
    assert is_complete(state, POLICY, at(70)) is Completion.UNRELEASED_IDLE


def test_forced_close_after_max_wait_even_if_instances_keep_coming() -> None:
    state = StudyArrival(T0, at(599), last_released_at=None)
    assert is_complete(state, POLICY, at(600)) is Completion.FORCED


def test_routing_selects_ct_series_and_says_why_not_for_others() -> None:
    rules = [Rule(name="ct", models=("seg",), modality=("CT",))]
    ct = SeriesFacts("1.2.1", "CT", 20)
    mr = SeriesFacts("1.2.2", "MR", 20)
    chosen = select_models([ct, mr], rules)
    assert [(s.series_instance_uid, s.model, s.rule) for s in chosen] == [("1.2.1", "seg", "ct")]
    assert rule_rejects(mr, rules[0]) == "Modality MR not in ['CT']"


def test_routing_runs_each_model_once_per_series_even_if_two_rules_match() -> None:
    rules = [
        Rule(name="a", models=("seg",), modality=("CT",), priority=5),
        Rule(name="b", models=("seg", "cls")),
    ]
    chosen = select_models([SeriesFacts("1.2.1", "CT", 3)], rules)
    assert [(s.model, s.rule, s.priority) for s in chosen] == [("seg", "a", 5), ("cls", "b", 0)]


def test_routing_min_instances() -> None:
    rule = Rule(name="vol", models=("seg",), min_instances=10)
    assert select_models([SeriesFacts("1.2.3", "CT", 9)], [rule]) == []


def test_only_a_queued_job_can_start_running() -> None:
    assert sources_of(JobStatus.RUNNING) == {JobStatus.QUEUED}
    assert not can_transition(JobStatus.SUCCEEDED, JobStatus.RUNNING)
    assert not can_transition(JobStatus.SUPERSEDED, JobStatus.QUEUED)
    assert can_transition(JobStatus.FAILED, JobStatus.QUEUED)


def test_derived_uids_are_stable_valid_and_distinct() -> None:
    a = job_result_uids("2.25", "1.2.3", "1.2.3.4", "model", "1.0")
    assert a == job_result_uids("2.25", "1.2.3", "1.2.3.4", "model", "1.0")
    assert len(set(a)) == 4
    for uid in a:
        assert len(uid) <= 64 and uid.startswith("2.25.")
        assert all(part == "0" or not part.startswith("0") for part in uid.split("."))
    assert a != job_result_uids("2.25", "1.2.3", "1.2.3.4", "model", "1.1")


def test_device_uid_changes_with_model_version() -> None:
    assert device_uid("1.2.826.0.1", "m", "1") != device_uid("1.2.826.0.1", "m", "2")


def test_long_uid_root_still_gives_64_characters_at_most() -> None:
    root = "1.2.826.0.1.3680043.10.999.123456789012"
    uid = derive_uid(root, "x")
    assert len(uid) <= 64 and uid.startswith(root + ".")


@pytest.mark.parametrize("root", ["", "1..2", "01.2", "1.2.", "abc"])
def test_invalid_uid_roots_are_refused(root: str) -> None:
    with pytest.raises(ValueError):
        validate_uid_root(root)
