"""Which models run on which series: a pure function of series attributes and rules.

A rule applies to a series when every condition it gives holds; a condition left empty
matches anything. ``explain`` says, for every (series, rule) pair, why the rule does not
apply, in words an administrator can act on (``pacs-agent rules test``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeriesFacts:
    """The attributes of a series that routing rules may test."""

    series_instance_uid: str
    modality: str
    num_instances: int
    body_part_examined: str = ""
    study_description: str = ""
    series_description: str = ""
    sop_class_uids: frozenset[str] = frozenset()
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    calling_ae_titles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Rule:
    """A routing rule. Text comparisons of coded values ignore case; regexes are searched
    (anchor them with ``^...$`` for a full match) and ignore case."""

    name: str
    models: tuple[str, ...]
    modality: tuple[str, ...] = ()
    body_part_examined: tuple[str, ...] = ()
    study_description: str | None = None
    series_description: str | None = None
    sop_class_uid: tuple[str, ...] = ()
    image_type_includes: tuple[str, ...] = ()
    image_type_excludes: tuple[str, ...] = ()
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    min_instances: int = 1
    max_instances: int | None = None
    calling_ae_title: tuple[str, ...] = ()
    priority: int = 0
    _compiled: dict[str, re.Pattern[str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def pattern(self, which: str) -> re.Pattern[str] | None:
        source = getattr(self, which)
        if source is None:
            return None
        if which not in self._compiled:
            self._compiled[which] = re.compile(source, re.IGNORECASE)
        return self._compiled[which]


@dataclass(frozen=True)
class Selection:
    """One (series, model) pair to run, with the rule that chose it."""

    series_instance_uid: str
    model: str
    rule: str
    priority: int


def _in(value: str, allowed: tuple[str, ...]) -> bool:
    return value.upper() in {a.upper() for a in allowed}


def _show(value: str) -> str:
    return value or "(empty)"


def rule_rejects(series: SeriesFacts, rule: Rule) -> str | None:
    """Why ``rule`` does not apply to ``series`` (the first failing condition), or None."""
    if rule.modality and not _in(series.modality, rule.modality):
        return f"Modality {_show(series.modality)} not in {list(rule.modality)}"
    if rule.body_part_examined and not _in(series.body_part_examined, rule.body_part_examined):
        return (
            f"BodyPartExamined {_show(series.body_part_examined)} "
            f"not in {list(rule.body_part_examined)}"
        )
    for which, value, keyword in (
        ("study_description", series.study_description, "StudyDescription"),
        ("series_description", series.series_description, "SeriesDescription"),
    ):
        pattern = rule.pattern(which)
        if pattern is not None and not pattern.search(value):
            return f"{keyword} {_show(value)} does not match /{pattern.pattern}/"
    if rule.sop_class_uid and not series.sop_class_uids & set(rule.sop_class_uid):
        return f"SOP classes {sorted(series.sop_class_uids)} not in {list(rule.sop_class_uid)}"
    image_type = {v.upper() for v in series.image_type}
    missing = [v for v in rule.image_type_includes if v.upper() not in image_type]
    if missing:
        return f"ImageType {list(series.image_type)} lacks {missing}"
    excluded = [v for v in rule.image_type_excludes if v.upper() in image_type]
    if excluded:
        return f"ImageType {list(series.image_type)} has excluded {excluded}"
    if rule.slice_thickness_min is not None or rule.slice_thickness_max is not None:
        t = series.slice_thickness
        lo = rule.slice_thickness_min
        hi = rule.slice_thickness_max
        if t is None:
            return "SliceThickness missing; the rule needs a range"
        if lo is not None and t < lo:
            return f"SliceThickness {t:g} mm < {lo:g} mm"
        if hi is not None and t > hi:
            return f"SliceThickness {t:g} mm > {hi:g} mm"
    if series.num_instances < rule.min_instances:
        return f"{series.num_instances} instances < {rule.min_instances}"
    if rule.max_instances is not None and series.num_instances > rule.max_instances:
        return f"{series.num_instances} instances > {rule.max_instances}"
    if rule.calling_ae_title and not any(
        _in(ae, rule.calling_ae_title) for ae in series.calling_ae_titles
    ):
        return (
            f"sent by {sorted(series.calling_ae_titles) or '(unknown)'}, "
            f"not by {list(rule.calling_ae_title)}"
        )
    return None


def select_models(series: Sequence[SeriesFacts], rules: Sequence[Rule]) -> list[Selection]:
    """Every (series, model) pair some rule selects, each pair once.

    Of several rules selecting one pair, the one with the highest priority wins (the first
    in the list on a tie), so an urgent rule is never hidden by a routine one.
    """
    chosen: dict[tuple[str, str], Selection] = {}
    for s in series:
        for rule in rules:
            if rule_rejects(s, rule) is not None:
                continue
            for model in rule.models:
                key = (s.series_instance_uid, model)
                current = chosen.get(key)
                if current is None or rule.priority > current.priority:
                    chosen[key] = Selection(s.series_instance_uid, model, rule.name, rule.priority)
    return list(chosen.values())


@dataclass(frozen=True)
class Verdict:
    """What one rule says about one series."""

    series_instance_uid: str
    rule: str
    models: tuple[str, ...]
    applies: bool
    reason: str


def explain(series: Sequence[SeriesFacts], rules: Sequence[Rule]) -> list[Verdict]:
    """For every series and rule: does the rule apply, and if not, why."""
    out: list[Verdict] = []
    for s in series:
        for rule in rules:
            why = rule_rejects(s, rule)
            out.append(
                Verdict(
                    s.series_instance_uid,
                    rule.name,
                    rule.models,
                    why is None,
                    why or "all conditions hold",
                )
            )
    return out
