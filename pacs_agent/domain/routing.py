"""Which models run on which series: a pure function of series attributes and rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesFacts:
    """The attributes of a series that routing rules may test."""

    series_instance_uid: str
    modality: str
    num_instances: int


@dataclass(frozen=True)
class Rule:
    name: str
    models: tuple[str, ...]
    modality: tuple[str, ...] = ()
    min_instances: int = 1
    priority: int = 0


@dataclass(frozen=True)
class Selection:
    """One (series, model) pair to run, with the rule that chose it."""

    series_instance_uid: str
    model: str
    rule: str
    priority: int


def rule_rejects(series: SeriesFacts, rule: Rule) -> str | None:
    """Why ``rule`` does not apply to ``series``, or None when it applies."""
    if rule.modality and series.modality not in rule.modality:
        return f"Modality {series.modality or '(empty)'} not in {list(rule.modality)}"
    if series.num_instances < rule.min_instances:
        return f"{series.num_instances} instances < {rule.min_instances}"
    return None


def select_models(series: Sequence[SeriesFacts], rules: Sequence[Rule]) -> list[Selection]:
    """Every (series, model) pair some rule selects, each pair once (first rule wins)."""
    chosen: dict[tuple[str, str], Selection] = {}
    for s in series:
        for rule in rules:
            if rule_rejects(s, rule) is not None:
                continue
            for model in rule.models:
                chosen.setdefault(
                    (s.series_instance_uid, model),
                    Selection(s.series_instance_uid, model, rule.name, rule.priority),
                )
    return list(chosen.values())
