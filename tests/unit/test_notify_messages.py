"""The notification builders on plain facts: HL7 ORU^R01, FHIR Bundle, webhook document."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from hl7apy.parser import parse_message

from pacs_agent.config import Hl7Notifier
from pacs_agent.notify.facts import FindingFact, NotificationFacts, PatientHeader, event_id
from pacs_agent.notify.fhir import build_bundle
from pacs_agent.notify.hl7 import build_oru, escape, parse_ack, unescape
from pacs_agent.notify.webhook import payload

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "notification.schema.json"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
NOTIFIER = Hl7Notifier(kind="hl7", name="ris", host="127.0.0.1", port=2575)

FACTS = NotificationFacts(
    notification_id=7,
    event_id=event_id(3, "ris", "findings"),
    event="findings",
    job_id=3,
    job_status="succeeded",
    job_reason=None,
    model_name="demo_ct_blob_seg",
    model_version="0.1.0",
    study_instance_uid="1.2.3.4",
    series_instance_uid="1.2.3.4.5",
    modality="CT",
    accession_number="A&B|1",
    patient_id="P~1\\2",
    study_date="20261204",
    study_description=None,
    job_ai_flag="positive",
    study_ai_flag="positive",
    suggested_priority="urgent",
    flag_reasons=("job 3 demo_ct_blob_seg: positive: Blob 1341 mm3",),
    seg_sop_instance_uid="1.2.3.4.6",
    sr_sop_instance_uid="1.2.3.4.7",
    finished_at=NOW,
    findings=(
        FindingFact(
            "segment", 1, "Blob", "4147007", "SCT", "Mass", True, True, 1341.4, 211.6, None, None
        ),
    ),
    patient=PatientHeader(name="Doe^Jane", birth_date="19700101", sex="F"),
)


@pytest.mark.parametrize("text", ["plain", "a|b^c&d~e\\f", "\\F\\ literally", ""])
def test_er7_escaping_round_trips_every_delimiter(text: str) -> None:
    escaped = escape(text)
    assert not any(c in escaped for c in "|^&~") and unescape(escaped) == text


def test_oru_escapes_identifiers_and_parses_back() -> None:
    oru = parse_message(build_oru(FACTS, NOTIFIER, NOW), find_groups=True)
    result = oru.oru_r01_patient_result
    assert unescape(result.oru_r01_patient.pid.pid_3.to_er7()) == "P~1\\2"
    assert unescape(result.oru_r01_order_observation.obr.obr_18.to_er7()) == "A&B|1"
    assert result.oru_r01_patient.pid.pid_5.to_er7() == "Doe^Jane"


def test_oru_without_a_patient_name_or_accession_still_validates() -> None:
    bare = replace(FACTS, patient=PatientHeader(), accession_number=None, patient_id="X")
    oru = parse_message(build_oru(bare, NOTIFIER, NOW), find_groups=True)
    obr = oru.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_18.to_er7() == ""


def test_oru_for_a_failed_job_says_why_with_result_status_x() -> None:
    failed = replace(FACTS, event="failed", job_reason="ValueError: 1 image(s)", findings=())
    oru = parse_message(build_oru(failed, NOTIFIER, NOW), find_groups=True)
    order = oru.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "X"
    texts = [o.obx.obx_5.to_er7() for o in order.oru_r01_observation]
    assert "not processed: ValueError: 1 image(s)" in texts


def test_ack_parser_reads_code_control_id_and_text() -> None:
    ack = parse_ack(
        "MSH|^~\\&|RIS||PACS-AGENT||20261204||ACK^R01^ACK|A1|P|2.5.1\rMSA|AE|N7|bad PID"
    )
    assert (ack.code, ack.control_id, ack.text) == ("AE", "N7", "bad PID")
    with pytest.raises(ValueError):
        parse_ack("not hl7 at all")


def test_fhir_bundle_names_no_accession_when_there_is_none() -> None:
    bundle = build_bundle(replace(FACTS, accession_number=None), NOW)
    report = bundle["entry"][0]["resource"]
    assert [i["system"] for i in report["identifier"]] == ["urn:ietf:rfc:3986"]
    assert report["result"] == [{"reference": e["fullUrl"]} for e in bundle["entry"][1:]]


def test_webhook_document_matches_the_published_schema_for_both_events() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(payload(FACTS, NOW), schema)
    failed = replace(FACTS, event="failed", job_reason="boom", findings=(), job_ai_flag=None)
    jsonschema.validate(payload(failed, NOW), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload(FACTS, NOW) | {"patient_id": "P1"}, schema)


def test_event_id_is_stable_per_job_notifier_and_event() -> None:
    assert event_id(3, "ris", "findings") == event_id(3, "ris", "findings")
    assert (
        len(
            {
                event_id(3, "ris", "findings"),
                event_id(3, "ris", "failed"),
                event_id(4, "ris", "findings"),
            }
        )
        == 3
    )
