"""FHIR R4: a DiagnosticReport with one Observation per finding, as a transaction Bundle.

The resources are validated with fhir.resources before anything is sent. fhir.resources 8
ships the R4B models (FHIR 4.3.0) as its R4-family sub-package: DiagnosticReport,
Observation, ImagingStudy references and Bundle are unchanged from R4 4.0.1 (decision
0016). The Bundle is POSTed to the configured base URL with bearer authentication;
the DiagnosticReport is created conditionally (``ifNoneExist`` on its identifier, the
notification's event id), so a re-send after a lost answer does not make a second report.

- DiagnosticReport: status ``final`` (findings) or ``cancelled`` (the AI could not process
  the series); category RAD; code LOINC 18748-4 (Diagnostic imaging study); identifiers
  ``urn:uuid:<event id>`` and the Accession Number (type ACSN); subject a logical reference
  to the patient (Patient ID); ``imagingStudy`` a logical reference to the ImagingStudy by
  its Study Instance UID (system ``urn:dicom:uid``); conclusion and conclusionCode the AI
  flag and the suggested priority.
- Observation per finding: code from the model card (SNOMED CT, DICOM, ...), a segment's
  volume in mm3 or a classification's probability (UCUM ``1``), interpretation A/N (flagged
  or not), ``derivedFrom`` the ImagingStudy, ``device`` the model by name.
- Observation "AI study flag": the flag (none / positive / critical) with the suggested
  priority (request-priority: routine / urgent / stat) as a component.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from pacs_agent.config import FhirNotifier
from pacs_agent.notify.errors import Refused
from pacs_agent.notify.facts import NotificationFacts
from pacs_agent.notify.http import post

FHIR_JSON = "application/fhir+json"
UCUM = "http://unitsofmeasure.org"
FLAG_SYSTEM = "urn:pacs-agent:ai-flag"
LOCAL_SYSTEM = "urn:pacs-agent:codes"
#: DICOM coding scheme designators and their FHIR system URIs.
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": UCUM,
    "RADLEX": "http://radlex.org",
}


def _system(scheme: str) -> str:
    return SYSTEMS.get(scheme.upper(), f"urn:dicom:coding-scheme:{scheme}")


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds")


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _full_url(facts: NotificationFacts, part: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.UUID(facts.event_id), part)}"


def build_bundle(facts: NotificationFacts, now: datetime) -> dict[str, Any]:
    """The transaction Bundle of ``facts`` as FHIR JSON, validated with the R4B models
    (raises pydantic's ValidationError when a resource is not valid)."""
    subject: dict[str, Any] = {"type": "Patient", "identifier": {"value": facts.patient_id or ""}}
    if facts.patient.issuer_of_patient_id:
        subject["identifier"]["assigner"] = {"display": facts.patient.issuer_of_patient_id}
    if not facts.patient_id:
        subject = {"display": "patient without Patient ID"}
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{facts.study_instance_uid}"},
    }
    device = {"display": f"{facts.model_name} {facts.model_version or ''}".strip()}
    effective = _instant(facts.finished_at or now)
    category = [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "imaging",
                }
            ]
        }
    ]

    entries: list[dict[str, Any]] = []
    results: list[dict[str, str]] = []

    def observation(part: str, resource: dict[str, Any]) -> None:
        full_url = _full_url(facts, part)
        resource = {
            "resourceType": "Observation",
            "status": "final",
            "category": category,
            "subject": subject,
            "effectiveDateTime": effective,
            "derivedFrom": [study_ref],
            "device": device,
            **resource,
        }
        Observation.model_validate(resource)
        entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
        results.append({"reference": full_url})

    if facts.event == "findings":
        for f in facts.findings:
            code = {
                "coding": [
                    {
                        "system": _system(f.code_scheme),
                        "code": f.code_value,
                        "display": f.code_meaning,
                    }
                ],
                "text": f.label,
            }
            interpretation = [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                            "code": "A" if f.flag else "N",
                        }
                    ]
                }
            ]
            if f.kind == "classification" and f.probability is not None:
                value = {
                    "value": round(f.probability, 6),
                    "unit": "probability",
                    "system": UCUM,
                    "code": "1",
                }
            else:
                value = {
                    "value": round(f.volume_mm3 or 0.0, 3),
                    "unit": "mm3",
                    "system": UCUM,
                    "code": "mm3",
                }
            observation(
                f"{f.kind}-{f.number}",
                {"code": code, "valueQuantity": value, "interpretation": interpretation},
            )
        observation(
            "ai-flag",
            {
                "code": {
                    "coding": [
                        {"system": LOCAL_SYSTEM, "code": "ai-flag", "display": "AI study flag"}
                    ]
                },
                "valueCodeableConcept": {
                    "coding": [{"system": FLAG_SYSTEM, "code": facts.study_ai_flag}],
                    "text": facts.study_ai_flag,
                },
                "component": [
                    {
                        "code": {
                            "coding": [
                                {
                                    "system": LOCAL_SYSTEM,
                                    "code": "ai-priority",
                                    "display": "AI suggested reading priority",
                                }
                            ]
                        },
                        "valueCodeableConcept": {
                            "coding": [
                                {
                                    "system": "http://hl7.org/fhir/request-priority",
                                    "code": facts.suggested_priority,
                                }
                            ]
                        },
                    }
                ],
            },
        )
        conclusion = (
            f"AI flag {facts.study_ai_flag}, suggested priority {facts.suggested_priority}"
            + "".join(f"; {r}" for r in facts.flag_reasons)
        )
        status = "final"
    else:
        conclusion = f"The AI could not process this series: {facts.job_reason or 'failed'}"
        status = "cancelled"

    identifiers: list[dict[str, Any]] = [
        {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{facts.event_id}"}
    ]
    if facts.accession_number:
        identifiers.append(
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": facts.accession_number,
            }
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": status,
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": f"AI results: {facts.model_name}",
        },
        "subject": subject,
        "effectiveDateTime": effective,
        "issued": _instant(now),
        "imagingStudy": [study_ref],
        "conclusion": conclusion[:4000],
    }
    if results:
        report["result"] = results
    if facts.event == "findings":
        report["conclusionCode"] = [
            {"coding": [{"system": FLAG_SYSTEM, "code": facts.study_ai_flag}]}
        ]
    DiagnosticReport.model_validate(report)
    entries.insert(
        0,
        {
            "fullUrl": _full_url(facts, "report"),
            "resource": report,
            "request": {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": f"identifier=urn:ietf:rfc:3986|urn:uuid:{facts.event_id}",
            },
        },
    )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    Bundle.model_validate(bundle)
    return bundle


def deliver_fhir(
    facts: NotificationFacts, notifier: FhirNotifier, now: datetime, timeout_s: float
) -> str:
    """POST the Bundle to the base URL; the HTTP status when accepted. Raises Refused
    (4xx, or a Bundle that does not validate) or Unreachable (no answer, 5xx)."""
    try:
        bundle = build_bundle(facts, now)
    except ValidationError as exc:  # names the elements, never their values (PHI)
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in exc.errors()
        )
        raise Refused(f"the FHIR Bundle does not validate: {where}"[:2000]) from exc
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if notifier.token is not None:
        headers["Authorization"] = f"Bearer {notifier.token.get_secret_value()}"
    body = json.dumps(bundle, separators=(",", ":")).encode("utf-8")
    return post(notifier.base_url, body, headers, timeout_s=timeout_s, ca_file=notifier.ca_file)
