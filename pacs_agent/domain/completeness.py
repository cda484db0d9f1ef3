"""Is a study complete? A pure decision: the clock and the policy are passed in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True)
class CompletenessPolicy:
    idle_timeout_s: float
    unreleased_timeout_s: float
    max_wait_s: float


@dataclass(frozen=True)
class StudyArrival:
    """What the index knows about a study that is still receiving."""

    first_received_at: datetime
    last_received_at: datetime
    #: When an association that carried instances of this study was last released,
    #: or None if none has been released yet.
    last_released_at: datetime | None


class Completion(StrEnum):
    WAITING = "waiting"
    RELEASED_AND_IDLE = "released_and_idle"
    UNRELEASED_IDLE = "unreleased_idle"
    FORCED = "forced"


def is_complete(state: StudyArrival, policy: CompletenessPolicy, now: datetime) -> Completion:
    """Decide whether a study is complete at ``now``.

    Complete when (a) an association was released after the last instance arrived and
    ``idle_timeout_s`` has passed since that instance, or (b) no instance arrived for
    ``unreleased_timeout_s`` (an aborted or never-released association), or (c) forced,
    ``max_wait_s`` after the first instance. Returns WAITING otherwise.
    """
    idle = (now - state.last_received_at).total_seconds()
    released = (
        state.last_released_at is not None and state.last_released_at >= state.last_received_at
    )
    if released and idle >= policy.idle_timeout_s:
        return Completion.RELEASED_AND_IDLE
    if idle >= policy.unreleased_timeout_s:
        return Completion.UNRELEASED_IDLE
    if (now - state.first_received_at).total_seconds() >= policy.max_wait_s:
        return Completion.FORCED
    return Completion.WAITING


@dataclass(frozen=True)
class PolicyOverride:
    """A routing rule's own completeness timeouts; None keeps the ``[assembler]`` value."""

    idle_timeout_s: float | None = None
    max_wait_s: float | None = None

    def apply(self, default: CompletenessPolicy) -> CompletenessPolicy:
        return replace(
            default,
            idle_timeout_s=default.idle_timeout_s
            if self.idle_timeout_s is None
            else self.idle_timeout_s,
            max_wait_s=default.max_wait_s if self.max_wait_s is None else self.max_wait_s,
        )


def most_patient(policies: Iterable[CompletenessPolicy]) -> CompletenessPolicy:
    """The policy of a study whose series match several rules: each timeout is the longest
    any of them asks for, so no rule sees its study closed earlier than it wants.
    Raises ValueError for no policies."""
    items = list(policies)
    if not items:
        raise ValueError("no completeness policy given")
    return CompletenessPolicy(
        idle_timeout_s=max(p.idle_timeout_s for p in items),
        unreleased_timeout_s=max(p.unreleased_timeout_s for p in items),
        max_wait_s=max(p.max_wait_s for p in items),
    )


def least_patient(policies: Iterable[CompletenessPolicy]) -> CompletenessPolicy:
    """The earliest any policy could close a study: a cheap first check before the study's
    own policy is worked out. Raises ValueError for no policies."""
    items = list(policies)
    if not items:
        raise ValueError("no completeness policy given")
    return CompletenessPolicy(
        idle_timeout_s=min(p.idle_timeout_s for p in items),
        unreleased_timeout_s=min(p.unreleased_timeout_s for p in items),
        max_wait_s=min(p.max_wait_s for p in items),
    )
