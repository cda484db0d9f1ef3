"""Routing rules: each condition on its own, priorities, and the explanations admins read."""

from __future__ import annotations

import pytest

from pacs_agent.config import RoutingRule, Settings, load_settings
from pacs_agent.domain.jobs import retry_delay
from pacs_agent.domain.routing import Rule, SeriesFacts, explain, rule_rejects, select_models
from pacs_agent.scheduler import rules_from, time_limits

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def series(**kw: object) -> SeriesFacts:
    base: dict[str, object] = {
        "series_instance_uid": "1.2.3",
        "modality": "CT",
        "num_instances": 120,
        "body_part_examined": "ABDOMEN",
        "study_description": "CT ABDOMEN W CONTRAST",
        "series_description": "Axial 1.0 Br40",
        "sop_class_uids": frozenset({CT_IMAGE}),
        "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "slice_thickness": 1.0,
        "calling_ae_titles": frozenset({"CT_SCANNER_1"}),
    }
    base.update(kw)
    return SeriesFacts(**base)  # type: ignore[arg-type]


RULE = Rule(
    name="abdomen-ct",
    models=("seg",),
    modality=("CT",),
    body_part_examined=("abdomen", "chest"),
    study_description=r"abdomen",
    series_description=r"^axial",
    sop_class_uid=(CT_IMAGE, ENHANCED_CT),
    image_type_includes=("AXIAL",),
    image_type_excludes=("LOCALIZER", "DERIVED"),
    slice_thickness_min=0.5,
    slice_thickness_max=3.0,
    min_instances=20,
    max_instances=2000,
    calling_ae_title=("CT_SCANNER_1",),
)


def test_a_series_meeting_every_condition_is_selected() -> None:
    assert rule_rejects(series(), RULE) is None
    assert [(s.model, s.rule) for s in select_models([series()], [RULE])] == [("seg", "abdomen-ct")]


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        ({"modality": "MR"}, "Modality MR not in ['CT']"),
        ({"body_part_examined": "HEAD"}, "BodyPartExamined HEAD not in"),
        ({"body_part_examined": ""}, "BodyPartExamined (empty)"),
        ({"study_description": "CT HEAD"}, "StudyDescription CT HEAD does not match /abdomen/"),
        ({"series_description": "Coronal MPR"}, "SeriesDescription Coronal MPR"),
        ({"sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.7"})}, "SOP classes"),
        ({"image_type": ("ORIGINAL", "PRIMARY")}, "lacks ['AXIAL']"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "AXIAL", "LOCALIZER")}, "excluded ['LOCALIZER']"),
        ({"slice_thickness": 5.0}, "SliceThickness 5 mm > 3 mm"),
        ({"slice_thickness": 0.3}, "SliceThickness 0.3 mm < 0.5 mm"),
        ({"slice_thickness": None}, "SliceThickness missing"),
        ({"num_instances": 3}, "3 instances < 20"),
        ({"num_instances": 5000}, "5000 instances > 2000"),
        ({"calling_ae_titles": frozenset({"MR_1"})}, "sent by ['MR_1'], not by ['CT_SCANNER_1']"),
    ],
)
def test_each_condition_rejects_with_its_reason(facts: dict[str, object], why: str) -> None:
    reason = rule_rejects(series(**facts), RULE)
    assert reason is not None and why in reason
    assert select_models([series(**facts)], [RULE]) == []


def test_coded_values_ignore_case_and_regexes_are_searched() -> None:
    rule = Rule(name="r", models=("m",), modality=("ct",), series_description="br40")
    assert rule_rejects(series(modality="CT", series_description="AXIAL 1.0 BR40"), rule) is None


def test_empty_conditions_match_anything() -> None:
    rule = Rule(name="any", models=("m",))
    odd = series(modality="", body_part_examined="", image_type=(), slice_thickness=None)
    assert rule_rejects(odd, rule) is None


def test_the_highest_priority_rule_wins_a_shared_model() -> None:
    routine = Rule(name="routine", models=("seg",), priority=0)
    urgent = Rule(name="urgent", models=("seg",), calling_ae_title=("CT_SCANNER_1",), priority=9)
    (chosen,) = select_models([series()], [routine, urgent])
    assert (chosen.rule, chosen.priority) == ("urgent", 9)
    (other,) = select_models([series(calling_ae_titles=frozenset({"X"}))], [routine, urgent])
    assert (other.rule, other.priority) == ("routine", 0)


def test_explain_covers_every_series_and_rule() -> None:
    verdicts = explain([series(), series(series_instance_uid="9.9", modality="SR")], [RULE])
    assert [(v.series_instance_uid, v.applies) for v in verdicts] == [
        ("1.2.3", True),
        ("9.9", False),
    ]
    assert verdicts[0].reason == "all conditions hold"
    assert "Modality SR" in verdicts[1].reason


def test_rules_in_settings_become_domain_rules() -> None:
    settings = load_settings(
        None,
        models={
            "rules": [
                {
                    "name": "urgent-head",
                    "models": ["ich"],
                    "priority": 9,
                    "body_part_examined": ["HEAD"],
                    "series_description": "^ax",
                    "image_type_excludes": ["LOCALIZER"],
                    "slice_thickness_max": 5,
                }
            ]
        },
    )
    (rule,) = rules_from(settings)
    assert rule.priority == 9 and rule.image_type_excludes == ("LOCALIZER",)
    assert (
        rule_rejects(series(body_part_examined="HEAD", series_description="AX 5mm"), rule) is None
    )


def test_an_invalid_regex_is_refused_when_the_settings_load() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        RoutingRule(name="bad", models=["m"], series_description="([unclosed")


def test_time_limits_per_model_override_the_worker_defaults() -> None:
    settings = Settings(models={"time_limits": {"slow": {"soft_s": 5, "hard_s": 9}}})  # type: ignore[arg-type]
    assert (time_limits(settings, "slow").soft_s, time_limits(settings, "slow").hard_s) == (5, 9)
    default = time_limits(settings, "other")
    assert (default.soft_s, default.hard_s) == (
        settings.worker.soft_time_limit_s,
        settings.worker.time_limit_s,
    )


def test_retry_backoff_doubles_up_to_its_cap_and_stops_after_max_attempts() -> None:
    delays = [retry_delay(n, 5, base_s=10, max_s=35) for n in range(1, 7)]
    assert delays == [10, 20, 35, 35, None, None]
