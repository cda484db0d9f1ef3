"""The AI flag of a job and of a study, and the reading priority it suggests (pure).

A model card's ``[flags]`` table says which findings make a study *positive* and which make it
*critical*; without positive rules any finding the model flagged (a detected segment, a
probability at or above the card's threshold) makes it positive, and without critical rules
nothing is critical. A study's flag is the highest flag of its jobs. The worklist decides
the reading order: we only suggest a priority (HL7 v2 table 0027 / FHIR request-priority).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum


class AIFlag(StrEnum):
    NONE = "none"
    POSITIVE = "positive"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {AIFlag.NONE: 0, AIFlag.POSITIVE: 1, AIFlag.CRITICAL: 2}

#: The suggested reading priority of each flag (FHIR request-priority codes).
PRIORITY = {AIFlag.NONE: "routine", AIFlag.POSITIVE: "urgent", AIFlag.CRITICAL: "stat"}
#: The same in HL7 v2 (table 0027: R routine, A as soon as possible, S stat).
HL7_PRIORITY = {"routine": "R", "urgent": "A", "stat": "S"}


@dataclass(frozen=True)
class FlagRule:
    """A finding matches when the model flagged it, its label is ``label`` (case ignored;
    None: any label) and every minimum given holds."""

    label: str | None = None
    min_volume_mm3: float | None = None
    min_probability: float | None = None

    def matches(self, finding: FindingFacts) -> bool:
        if not finding.flag:
            return False
        if self.label is not None and self.label.casefold() != finding.label.casefold():
            return False
        if self.min_volume_mm3 is not None and (
            finding.volume_mm3 is None or finding.volume_mm3 < self.min_volume_mm3
        ):
            return False
        return self.min_probability is None or (
            finding.probability is not None and finding.probability >= self.min_probability
        )


@dataclass(frozen=True)
class FlagRules:
    """A model card's ``[flags]``: ``positive`` None means any flagged finding."""

    critical: tuple[FlagRule, ...] = ()
    positive: tuple[FlagRule, ...] | None = None


@dataclass(frozen=True)
class FindingFacts:
    """What the flag rules look at in one finding."""

    label: str
    flag: bool
    volume_mm3: float | None = None
    probability: float | None = None


@dataclass(frozen=True)
class FlagOutcome:
    flag: AIFlag
    priority: str
    reason: str


def _describe(f: FindingFacts) -> str:
    parts = [f.label]
    if f.volume_mm3 is not None:
        parts.append(f"{f.volume_mm3:.0f} mm3")
    if f.probability is not None:
        parts.append(f"p={f.probability:.2f}")
    return " ".join(parts)


def job_flag(findings: Sequence[FindingFacts], rules: FlagRules) -> FlagOutcome:
    """The flag of one job's findings under its card's rules, with the findings that made it."""
    critical = [f for f in findings if any(r.matches(f) for r in rules.critical)]
    if critical:
        return FlagOutcome(
            AIFlag.CRITICAL,
            PRIORITY[AIFlag.CRITICAL],
            "critical: " + ", ".join(_describe(f) for f in critical),
        )
    if rules.positive is None:
        positive = [f for f in findings if f.flag]
    else:
        positive = [f for f in findings if any(r.matches(f) for r in rules.positive)]
    if positive:
        return FlagOutcome(
            AIFlag.POSITIVE,
            PRIORITY[AIFlag.POSITIVE],
            "positive: " + ", ".join(_describe(f) for f in positive),
        )
    return FlagOutcome(AIFlag.NONE, PRIORITY[AIFlag.NONE], "no finding flagged")


def study_flag(job_flags: Iterable[AIFlag]) -> AIFlag:
    """The study's flag: the highest of its jobs' flags (none without jobs)."""
    return max(job_flags, key=lambda f: f.rank, default=AIFlag.NONE)
