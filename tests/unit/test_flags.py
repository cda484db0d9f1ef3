"""The AI flag: model card ``[flags]`` rules over a job's findings, and the study's flag."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pacs_agent.catalog import CatalogError, load_catalog, read_card
from pacs_agent.domain.flags import (
    AIFlag,
    FindingFacts,
    FlagRule,
    FlagRules,
    job_flag,
    study_flag,
)

BUNDLES = Path(__file__).resolve().parents[2] / "workers" / "bundles"

NODULE = FindingFacts("Nodule", flag=True, probability=0.8)
FAINT_NODULE = FindingFacts("Nodule", flag=False, probability=0.2)
BIG_MASS = FindingFacts("Mass", flag=True, volume_mm3=25_000)
SMALL_MASS = FindingFacts("Mass", flag=True, volume_mm3=400)
NO_MASS = FindingFacts("Mass", flag=False, volume_mm3=0)


def test_without_rules_any_flagged_finding_is_positive_and_nothing_is_critical() -> None:
    assert job_flag([NODULE], FlagRules()).flag is AIFlag.POSITIVE
    assert job_flag([BIG_MASS], FlagRules()).flag is AIFlag.POSITIVE
    outcome = job_flag([FAINT_NODULE, NO_MASS], FlagRules())
    assert (outcome.flag, outcome.priority, outcome.reason) == (
        AIFlag.NONE,
        "routine",
        "no finding flagged",
    )
    assert job_flag([], FlagRules()).flag is AIFlag.NONE


def test_critical_rule_with_a_volume_minimum_makes_a_large_mass_stat() -> None:
    rules = FlagRules(critical=(FlagRule(label="mass", min_volume_mm3=20_000),))
    big = job_flag([SMALL_MASS, BIG_MASS], rules)
    assert (big.flag, big.priority) == (AIFlag.CRITICAL, "stat")
    assert big.reason == "critical: Mass 25000 mm3"
    small = job_flag([SMALL_MASS], rules)
    assert (small.flag, small.priority) == (AIFlag.POSITIVE, "urgent")


def test_rules_see_only_findings_the_model_flagged() -> None:
    # p=0.2 is below the card's threshold (flag False): a rule with a lower minimum still
    # does not make it positive or critical.
    rules = FlagRules(
        critical=(FlagRule(min_probability=0.1),), positive=(FlagRule(min_probability=0.1),)
    )
    assert job_flag([FAINT_NODULE], rules).flag is AIFlag.NONE


def test_positive_rules_narrow_what_is_positive_and_an_empty_list_means_never() -> None:
    only_big = FlagRules(positive=(FlagRule(min_volume_mm3=1000),))
    assert job_flag([SMALL_MASS], only_big).flag is AIFlag.NONE
    assert job_flag([BIG_MASS], only_big).flag is AIFlag.POSITIVE
    assert job_flag([NODULE, BIG_MASS], FlagRules(positive=())).flag is AIFlag.NONE


def test_probability_minimum_needs_a_probability() -> None:
    rule = FlagRule(min_probability=0.5)
    assert rule.matches(NODULE) and not rule.matches(BIG_MASS)


def test_study_flag_is_the_highest_of_its_jobs() -> None:
    assert study_flag([]) is AIFlag.NONE
    assert study_flag([AIFlag.NONE, AIFlag.POSITIVE]) is AIFlag.POSITIVE
    assert study_flag([AIFlag.CRITICAL, AIFlag.NONE, AIFlag.POSITIVE]) is AIFlag.CRITICAL


def _bundle(root: Path, flags: str) -> Path:
    bundle = root / "cls"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text("{}")
    meta = {"network_data_format": {"outputs": {"pred": {"num_channels": 2}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bundle / "models" / "model.pt").write_bytes(b"")
    card = """
        [model]
        name = "cls"
        version = "1.0"
        task = "classification"
        [[findings]]
        index = 1
        label = "Nodule"
        code = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
        threshold = 0.5
    """
    (bundle / "pacs-agent.toml").write_text(textwrap.dedent(card) + textwrap.dedent(flags))
    return bundle


def test_card_flags_table_is_read_into_rules(tmp_path: Path) -> None:
    card = read_card(
        _bundle(
            tmp_path,
            """
            [flags]
            critical = [{ label = "Nodule", min_probability = 0.95 }]
            positive = [{ label = "nodule", min_probability = 0.6 }]
            """,
        )
    )
    assert card.flags == FlagRules(
        critical=(FlagRule("Nodule", None, 0.95),), positive=(FlagRule("nodule", None, 0.6),)
    )
    assert card.as_dict()["flags"]["critical"] == [
        {"label": "Nodule", "min_volume_mm3": None, "min_probability": 0.95}
    ]
    assert read_card(_bundle(tmp_path / "plain", "")).flags == FlagRules()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ('[flags]\ncritical = [{ label = "Spleen" }]', "flags.critical: label 'Spleen' is not"),
        ("[flags]\ncritical = [{ min_probability = 1.5 }]", "flags.critical[0].min_probability"),
        ("[flags]\nurgent = []", "flags.urgent: Extra inputs are not permitted"),
    ],
)
def test_card_flags_errors_say_what_and_where(tmp_path: Path, flags: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_card(_bundle(tmp_path, flags))


def test_shipped_demo_cards_have_critical_rules() -> None:
    catalog = load_catalog(BUNDLES)
    assert catalog.errors == ()
    ct = catalog.get("demo_ct_blob_seg").flags
    assert ct.critical == (FlagRule("Blob", 20000.0, None),) and ct.positive is None
    cr = catalog.get("demo_cr_nodule_cls").flags
    assert cr.critical == (FlagRule("Nodule", None, 0.95),)
