"""Notifications from the outbox to real receivers on loopback: an MLLP listener (hl7apy's
MLLP server), a FHIR endpoint that validates with fhir.resources, a webhook receiver that
verifies the signature and the JSON schema. Each message is read back by the receiver.

The io task's body (``deliver``) runs in the test process; the whole service path (Celery,
the scheduler's sweep) is in test_notify_end_to_end.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from pacs_agent.cli.main import app
from pacs_agent.config import Settings, load_settings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance, Job, Notification, Series, Study, utcnow
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.domain.flags import FlagRule, FlagRules
from pacs_agent.findings import replace_findings
from pacs_agent.notify.hl7 import unescape
from pacs_agent.notify.outbox import create_notifications, deliver, dispatch_due
from pacs_agent.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.helpers.dicom_results import SPECS, box_mask, classifications, job_result, liver_ct
from tests.helpers.receivers import FhirServer, Hl7Receiver, WebhookReceiver
from tests.helpers.servers import free_port

pytestmark = pytest.mark.integration

PATIENT_ID = "PAT|7^X"  # HL7 delimiters in a real-world identifier must arrive escaped
ACCESSION = "ACC2026-0042"


@dataclass
class Site:
    settings: Settings
    sf: sessionmaker[Session]
    job_id: int
    study_uid: str
    series_uid: str
    notifiers: list[dict[str, Any]]

    def notify(self, event: str = "findings") -> list[int]:
        now = utcnow()
        with self.sf.begin() as s:
            create_notifications(s, self.settings.notify, self.job_id, event, now)
        with self.sf() as s:
            return [n.id for n in s.query(Notification).filter_by(job_id=self.job_id, event=event)]

    def row(self, notification_id: int) -> Notification:
        with self.sf() as s:
            row = s.get(Notification, notification_id)
            assert row is not None
            return row

    def env(self) -> dict[str, str]:
        return {
            "PACS_AGENT_DATA_DIR": str(self.settings.data_dir),
            "PACS_AGENT_DATABASE__URL": self.settings.database_url,
            "PACS_AGENT_NOTIFY__NOTIFIERS": json.dumps(self.notifiers),
        }


def _site(
    tmp_path: Path,
    notifiers: list[dict[str, Any]],
    job_status: str = "exported",
    database_url: str | None = None,
) -> Site:
    """A database with one study (its first CT image in the spool) and one finished job that
    found the liver and classified the study, with critical/positive card rules."""
    settings = load_settings(
        data_dir=tmp_path / "var",
        notify={
            "notifiers": notifiers,
            "backoff_initial_s": 30,
            "max_attempts": 3,
            "timeout_s": 3,
        },
        **({"database": {"url": database_url}} if database_url else {}),
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.database_url)
    sf = make_session_factory(make_engine(settings.database_url))
    ct = liver_ct()
    first: Dataset = ct[0]
    rel = Path("study") / "ct0.dcm"
    (settings.spool_dir / rel).parent.mkdir(parents=True)
    first.save_as(settings.spool_dir / rel, enforce_file_format=True)
    result = job_result(
        ct, segment_results(box_mask(ct), ct, SPECS), classifications=classifications(0.7, 0.1)
    )
    rules = FlagRules(critical=(FlagRule(label="pneumothorax", min_probability=0.6),))
    with sf.begin() as s:
        study = Study(
            study_instance_uid=str(first.StudyInstanceUID),
            patient_id=PATIENT_ID,
            accession_number=ACCESSION,
            study_date="20261204",
            status="complete",
        )
        s.add(study)
        s.flush()
        series = Series(
            study_id=study.id, series_instance_uid=str(first.SeriesInstanceUID), modality="CT"
        )
        s.add(series)
        s.flush()
        s.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=str(first.SOPInstanceUID),
                sop_class_uid=str(first.SOPClassUID),
                transfer_syntax_uid=str(first.file_meta.TransferSyntaxUID),
                path=str(rel),
                size_bytes=1,
                sha256="0" * 64,
            )
        )
        job = Job(
            study_id=study.id,
            series_id=series.id,
            model_name="liver_ct_demo",
            model_version="1.2.0",
            status=job_status,
            reason="RuntimeError: CUDA driver missing" if job_status == "failed" else None,
            seg_sop_instance_uid=result.uids.seg_sop_uid,
            sr_sop_instance_uid=result.uids.sr_sop_uid,
            finished_at=utcnow(),
        )
        s.add(job)
        s.flush()
        job_id = job.id
        if job_status != "failed":
            replace_findings(s, job_id, result, rules)
    return Site(
        settings,
        sf,
        job_id,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        notifiers,
    )


@pytest.fixture
def hl7() -> Iterator[Hl7Receiver]:
    receiver = Hl7Receiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def fhir() -> Iterator[FhirServer]:
    server = FhirServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


def _hl7_notifier(port: int) -> dict[str, Any]:
    return {
        "kind": "hl7",
        "name": "ris",
        "host": "127.0.0.1",
        "port": port,
        "receiving_application": "RIS",
        "receiving_facility": "RADIOLOGY",
    }


def _webhook_notifier(receiver: WebhookReceiver) -> dict[str, Any]:
    return {"kind": "webhook", "name": "hook", "url": receiver.url, "secret": receiver.secret}


# -- HL7 v2 ORU^R01 over MLLP -----------------------------------------------------------------


def test_hl7_oru_reaches_the_mllp_receiver_with_one_obx_per_finding_and_the_flag(
    tmp_path: Path, hl7: Hl7Receiver
) -> None:
    site = _site(tmp_path, [_hl7_notifier(hl7.port)])
    (nid,) = site.notify()
    assert deliver(site.settings, site.sf, nid) == "sent"
    row = site.row(nid)
    assert (row.state, row.attempts, row.response, row.last_error) == ("sent", 1, "AA", None)

    (message,) = hl7.messages()
    msh = message.msh
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_5.to_er7() == "RIS" and msh.msh_10.to_er7() == f"N{nid}"
    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert unescape(pid.pid_3.cx_1.to_er7()) == PATIENT_ID
    # PID-5 and PID-8 come from the stored image's patient module.
    assert (pid.pid_5.to_er7(), pid.pid_8.to_er7()) == ("JANCT000", "M")
    order = result.oru_r01_order_observation
    obr = order.obr
    assert obr.obr_18.to_er7() == ACCESSION and obr.obr_25.to_er7() == "F"
    assert obr.obr_4.to_er7().startswith("liver_ct_demo^liver_ct_demo 1.2.0^")
    obx = {o.obx.obx_3.ce_1.to_er7(): o.obx for o in order.oru_r01_observation}
    assert obx["110180"].obx_5.to_er7() == site.study_uid
    assert obx["112002"].obx_5.to_er7() == site.series_uid
    liver, spleen = obx["10200004"], obx["78961009"]  # SNOMED CT liver, spleen
    assert (liver.obx_2.to_er7(), liver.obx_6.ce_1.to_er7(), liver.obx_8.to_er7()) == (
        "NM",
        "mm3",
        "A",
    )
    assert float(liver.obx_5.to_er7()) > 0 and float(spleen.obx_5.to_er7()) == 0
    assert spleen.obx_8.to_er7() == "N"
    pneumothorax = obx["36118008"]
    assert float(pneumothorax.obx_5.to_er7()) == pytest.approx(0.7)
    assert pneumothorax.obx_6.ce_1.to_er7() == "1"
    # p=0.7 >= the card's critical rule (0.6): the study is critical, read STAT.
    assert obx["AI-FLAG"].obx_5.to_er7().split("^")[0] == "critical"
    assert obx["AI-PRIORITY"].obx_5.to_er7().split("^")[0] == "S"
    findings_obx = [k for k in obx if k not in ("110180", "112002", "AI-FLAG", "AI-PRIORITY")]
    assert len(findings_obx) == 4  # two segments, two classification outputs


@pytest.mark.parametrize(("code", "database"), [("AE", "sqlite"), ("AR", "postgresql")])
def test_hl7_error_ack_ends_the_notification_failed_and_notify_retry_sends_it_again(
    tmp_path: Path, hl7: Hl7Receiver, code: str, database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    site = _site(tmp_path, [_hl7_notifier(hl7.port)], database_url=url)
    hl7.ack_code, hl7.ack_text = code, "unknown order"
    (nid,) = site.notify()
    assert deliver(site.settings, site.sf, nid) == "failed"
    row = site.row(nid)
    assert (row.state, row.response, row.attempts) == ("failed", code, 1)
    assert row.last_error == f"HL7 {code}: unknown order"

    runner = CliRunner()
    listed = runner.invoke(app, ["notify", "list", "--json", "--state", "failed"], env=site.env())
    assert listed.exit_code == 0, listed.output
    assert [(r["id"], r["state"], r["response"]) for r in json.loads(listed.stdout)] == [
        (nid, "failed", code)
    ]
    hl7.ack_code, hl7.ack_text = "AA", ""
    retried = runner.invoke(app, ["notify", "retry", str(nid)], env=site.env())
    assert retried.exit_code == 0, retried.output
    assert site.row(nid).state == "pending"
    sent: list[int] = []
    assert dispatch_due(site.sf, sent.append, utcnow(), stale_after_s=300) == 1
    assert sent == [nid] and site.row(nid).state == "queued"
    assert deliver(site.settings, site.sf, nid) == "sent"
    assert len(hl7.received) == 2  # the same message, sent twice
    assert hl7.messages()[0].msh.msh_10.to_er7() == hl7.messages()[1].msh.msh_10.to_er7()


def test_hl7_receiver_down_loses_nothing_the_notification_waits_and_is_sent_when_it_is_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    site = _site(tmp_path, [_hl7_notifier(port)])
    (nid,) = site.notify()
    before = utcnow()
    assert deliver(site.settings, site.sf, nid) == "pending"
    row = site.row(nid)
    assert row.attempts == 1 and row.last_error and "ConnectionRefused" in row.last_error
    assert row.next_attempt_at is not None
    assert row.next_attempt_at >= before + timedelta(seconds=29)  # backoff_initial_s = 30
    sent: list[int] = []
    assert dispatch_due(site.sf, sent.append, utcnow(), stale_after_s=300) == 0  # not yet due
    receiver = Hl7Receiver(port=port)
    receiver.start()
    try:
        later = row.next_attempt_at + timedelta(seconds=1)
        assert dispatch_due(site.sf, sent.append, later, stale_after_s=300) == 1
        assert deliver(site.settings, site.sf, nid) == "sent"
        assert len(receiver.received) == 1 and site.row(nid).attempts == 2
    finally:
        receiver.stop()


def test_hl7_no_ack_is_tried_again_and_ends_failed_after_the_last_attempt(
    tmp_path: Path, hl7: Hl7Receiver
) -> None:
    hl7.ack_code = None  # the receiver reads the message and closes without an ACK
    site = _site(tmp_path, [_hl7_notifier(hl7.port)])
    (nid,) = site.notify()
    states = []
    for _ in range(3):  # max_attempts = 3
        states.append(deliver(site.settings, site.sf, nid))
    assert states == ["pending", "pending", "failed"]
    row = site.row(nid)
    assert row.last_error is not None and row.last_error.startswith("3 attempt(s), last error:")
    assert "ACK" in row.last_error and len(hl7.received) == 3


# -- FHIR R4 ----------------------------------------------------------------------------------


def _fhir_notifier(server: FhirServer, token: str | None = None) -> dict[str, Any]:
    return {
        "kind": "fhir",
        "name": "fhir",
        "base_url": server.url + "/fhir",
        "token": token or server.token,
    }


def test_fhir_bundle_is_validated_by_the_endpoint_with_a_report_observations_and_study(
    tmp_path: Path, fhir: FhirServer
) -> None:
    site = _site(tmp_path, [_fhir_notifier(fhir)])
    (nid,) = site.notify()
    assert deliver(site.settings, site.sf, nid) == "sent"
    assert site.row(nid).response == "200"
    (bundle,) = fhir.received
    resources = [e["resource"] for e in bundle["entry"]]
    report = resources[0]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert report["imagingStudy"] == [
        {
            "type": "ImagingStudy",
            "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{site.study_uid}"},
        }
    ]
    assert report["subject"]["identifier"]["value"] == PATIENT_ID
    assert {
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
        },
        "value": ACCESSION,
    } in report["identifier"]
    observations = resources[1:]
    assert len(report["result"]) == len(observations) == 5  # 4 findings + the AI flag
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    liver = by_code["10200004"]
    assert liver["code"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert liver["valueQuantity"]["code"] == "mm3" and liver["valueQuantity"]["value"] > 0
    assert by_code["36118008"]["valueQuantity"] == {
        "value": 0.7,
        "unit": "probability",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    flag = by_code["ai-flag"]
    assert flag["valueCodeableConcept"]["coding"][0]["code"] == "critical"
    assert flag["component"][0]["valueCodeableConcept"]["coding"][0]["code"] == "stat"
    assert bundle["entry"][0]["request"]["ifNoneExist"].startswith("identifier=urn:ietf:rfc:3986|")


def test_fhir_endpoint_refusing_the_token_ends_the_notification_failed_with_http_401(
    tmp_path: Path, fhir: FhirServer
) -> None:
    site = _site(tmp_path, [_fhir_notifier(fhir, token="wrong-token")])
    (nid,) = site.notify()
    assert deliver(site.settings, site.sf, nid) == "failed"
    row = site.row(nid)
    assert row.response == "401" and row.last_error and row.last_error.startswith("HTTP 401")
    assert fhir.rejected == ["bad or missing bearer token"] and not fhir.received


def test_fhir_endpoint_answering_503_is_tried_again_later_and_its_body_is_not_logged(
    tmp_path: Path, fhir: FhirServer, caplog: pytest.LogCaptureFixture
) -> None:
    fhir.force_status = 503  # with the Bundle echoed back in the error page
    site = _site(tmp_path, [_fhir_notifier(fhir)])
    (nid,) = site.notify()
    with caplog.at_level(logging.DEBUG):
        assert deliver(site.settings, site.sf, nid) == "pending"
    row = site.row(nid)
    assert row.response == "503" and row.last_error is not None
    assert row.last_error.startswith("HTTP 503") and "echo" in row.last_error  # kept in the DB
    assert "HTTP 503" in caplog.text
    assert "echo" not in caplog.text  # the answer's body (it may carry the payload) is not logged
    assert PATIENT_ID not in caplog.text and "JANCT000" not in caplog.text
    fhir.force_status = None
    assert deliver(site.settings, site.sf, nid) == "sent"
    assert len(fhir.received) == 1


def test_a_job_the_ai_could_not_process_sends_a_cancelled_report_and_a_failed_webhook(
    tmp_path: Path, fhir: FhirServer, webhook: WebhookReceiver
) -> None:
    site = _site(
        tmp_path,
        [
            _fhir_notifier(fhir),
            _webhook_notifier(webhook),
            _hl7_notifier(free_port()),  # HL7 wants findings only (its default events)
        ],
        job_status="failed",
    )
    ids = site.notify("failed")
    assert len(ids) == 2
    assert sorted(deliver(site.settings, site.sf, n) for n in ids) == ["sent", "sent"]
    (bundle,) = fhir.received
    report = bundle["entry"][0]["resource"]
    assert report["status"] == "cancelled" and "CUDA driver missing" in report["conclusion"]
    assert len(bundle["entry"]) == 1
    (doc,) = webhook.received
    assert doc["event"] == "failed" and doc["job"]["reason"] == "RuntimeError: CUDA driver missing"
    assert doc["findings"] == []


# -- webhooks ---------------------------------------------------------------------------------


def test_webhook_document_is_signed_matches_the_schema_and_a_resend_is_recognised(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    site = _site(
        tmp_path,
        [{"kind": "webhook", "name": "hook", "url": webhook.url, "secret": webhook.secret}],
    )
    (nid,) = site.notify()
    assert deliver(site.settings, site.sf, nid) == "sent"
    (doc,) = webhook.received
    assert doc["study"] == {
        "study_instance_uid": site.study_uid,
        "accession_number": ACCESSION,
        "study_date": "20261204",
    }
    assert doc["ai_flag"]["study"] == "critical" and doc["ai_flag"]["suggested_priority"] == "stat"
    assert PATIENT_ID not in json.dumps(doc)  # no patient identifier in webhooks
    assert [f["label"] for f in doc["findings"]] == ["liver", "spleen", "pneumothorax", "nodule"]

    runner = CliRunner()
    again = runner.invoke(app, ["notify", "retry", "--include-sent", str(nid)], env=site.env())
    assert again.exit_code == 0, again.output
    assert deliver(site.settings, site.sf, nid) == "sent"
    assert webhook.duplicates == 1 and len(webhook.received) == 1  # same event id


def test_webhook_signature_refuses_a_tampered_body_and_a_replayed_request(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    site = _site(
        tmp_path,
        [{"kind": "webhook", "name": "hook", "url": webhook.url, "secret": webhook.secret}],
    )
    captured: list[tuple[bytes, dict[str, str]]] = []

    def capture(facts: Any, notifier: Any, now: Any, settings: Any) -> str:
        from pacs_agent.notify.webhook import encode, payload, signed_headers

        body = encode(payload(facts, now))
        headers = signed_headers(webhook.secret, int(now.timestamp()), body, facts.event_id)
        captured.append((body, headers))
        return "captured"

    (nid,) = site.notify()
    deliver(site.settings, site.sf, nid, senders={"webhook": capture})
    ((body, headers),) = captured
    tampered = body.replace(b'"critical"', b'"none"', 1)
    assert requests.post(webhook.url, data=tampered, headers=headers, timeout=5).status_code == 401
    assert requests.post(webhook.url, data=body, headers=headers, timeout=5).status_code == 200
    webhook.tolerance_s = 1
    time.sleep(2.2)  # the same signed request, replayed later
    assert requests.post(webhook.url, data=body, headers=headers, timeout=5).status_code == 401
    assert webhook.rejected[0] == "signature does not match"
    assert "outside the 1 s tolerance" in webhook.rejected[1]
    forged = dict(headers, **{TIMESTAMP_HEADER: str(int(time.time()))})
    assert requests.post(webhook.url, data=body, headers=forged, timeout=5).status_code == 401
    assert SIGNATURE_HEADER in headers


def test_webhook_receiver_answering_4xx_ends_failed_and_5xx_waits(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    site = _site(
        tmp_path,
        [{"kind": "webhook", "name": "hook", "url": webhook.url, "secret": webhook.secret}],
    )
    (nid,) = site.notify()
    webhook.force_status = 500
    assert deliver(site.settings, site.sf, nid) == "pending"
    webhook.force_status = 410
    assert deliver(site.settings, site.sf, nid) == "failed"
    row = site.row(nid)
    assert (row.response, row.attempts) == ("410", 2)
    assert row.last_error is not None and row.last_error.startswith("HTTP 410")


def test_findings_command_shows_the_study_flag_and_suggested_priority(tmp_path: Path) -> None:
    site = _site(tmp_path, [])
    runner = CliRunner()
    text = runner.invoke(app, ["findings", site.study_uid], env=site.env())
    assert text.exit_code == 0, text.output
    assert f"study {site.study_uid}: AI flag critical, suggested priority stat" in text.stdout
    assert "critical: pneumothorax p=0.70" in text.stdout
    rows = json.loads(
        runner.invoke(app, ["findings", site.study_uid, "--json"], env=site.env()).stdout
    )
    assert {(r["study_ai_flag"], r["suggested_priority"], r["job_ai_flag"]) for r in rows} == {
        ("critical", "stat", "critical")
    }
    with site.sf.begin() as s:  # a superseded job's flag no longer counts
        job = s.get(Job, site.job_id)
        assert job is not None
        job.status = "superseded"
    assert runner.invoke(app, ["findings", site.study_uid], env=site.env()).exit_code == 3


def test_sweep_sends_again_a_lost_message_and_takes_back_a_row_a_dead_worker_held(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    site = _site(tmp_path, [_webhook_notifier(webhook)])
    (nid,) = site.notify()
    sent: list[int] = []
    now = utcnow()
    assert dispatch_due(site.sf, sent.append, now, stale_after_s=300) == 1
    assert dispatch_due(site.sf, sent.append, now + timedelta(seconds=10), 300) == 0
    # The broker lost the message: after stale_after_s the row is sent again.
    assert dispatch_due(site.sf, sent.append, now + timedelta(seconds=301), 300) == 1
    with site.sf.begin() as s:  # a worker took it and died while sending
        row = s.get(Notification, nid)
        assert row is not None
        row.state, row.attempts, row.updated_at = "sending", 1, now
    assert dispatch_due(site.sf, sent.append, now + timedelta(seconds=60), 300) == 0
    assert dispatch_due(site.sf, sent.append, now + timedelta(seconds=301), 300) == 1
    assert sent == [nid, nid, nid]

    def broker_down(notification_id: int) -> None:
        raise ConnectionError("broker down")

    with site.sf.begin() as s:
        row = s.get(Notification, nid)
        assert row is not None
        row.state = "pending"
    assert dispatch_due(site.sf, broker_down, now + timedelta(seconds=400), 300) == 0
    assert site.row(nid).state == "pending"  # waits for the next sweep
    assert deliver(site.settings, site.sf, nid) == "sent"
    assert site.row(nid).attempts == 2 and len(webhook.received) == 1
