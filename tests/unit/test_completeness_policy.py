"""Completeness policies per routing rule: pure combinations of timeouts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_agent.domain.completeness import (
    CompletenessPolicy,
    Completion,
    PolicyOverride,
    StudyArrival,
    is_complete,
    least_patient,
    most_patient,
)

DEFAULT = CompletenessPolicy(idle_timeout_s=3, unreleased_timeout_s=120, max_wait_s=3600)


def test_rule_override_replaces_only_the_timeouts_it_gives() -> None:
    assert PolicyOverride().apply(DEFAULT) == DEFAULT
    assert PolicyOverride(idle_timeout_s=30).apply(DEFAULT) == CompletenessPolicy(30, 120, 3600)
    assert PolicyOverride(max_wait_s=600).apply(DEFAULT) == CompletenessPolicy(3, 120, 600)


def test_study_matching_several_rules_waits_as_long_as_the_most_patient() -> None:
    fast = CompletenessPolicy(1, 120, 7200)
    slow = CompletenessPolicy(30, 60, 600)
    assert most_patient([fast, slow]) == CompletenessPolicy(30, 120, 7200)
    assert least_patient([fast, slow]) == CompletenessPolicy(1, 60, 600)
    with pytest.raises(ValueError):
        most_patient([])


def test_a_rules_own_idle_time_decides_when_its_study_completes() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    arrival = StudyArrival(t0, t0, last_released_at=t0)
    patient = PolicyOverride(idle_timeout_s=30).apply(DEFAULT)
    at_10s = t0 + timedelta(seconds=10)
    assert is_complete(arrival, DEFAULT, at_10s) is Completion.RELEASED_AND_IDLE
    assert is_complete(arrival, patient, at_10s) is Completion.WAITING
    assert is_complete(arrival, patient, t0 + timedelta(seconds=30)) is (
        Completion.RELEASED_AND_IDLE
    )
