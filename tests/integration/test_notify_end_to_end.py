"""Worklist integration through the running service: ``pacs-agent serve`` (embedded worker,
embedded broker) processes a synthetic CT study with the demo CT model, and an HL7 receiver
(hl7apy's MLLP server), a FHIR endpoint and a webhook receiver each get their message.

The HL7 receiver is down when the job finishes: its notification waits in the database and
the scheduler's sweep sends it again once the receiver is up (nothing is lost).

With ``PACS_AGENT_WRITE_SAMPLES=1`` the messages received here are written into
docs/integration.md as its samples; without it, the samples there are checked to be what
such a message looks like (they parse, validate and match the schema).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message
from sqlalchemy import select

from pacs_agent.db.models import Notification
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.orchestration import send_study, small_study
from tests.helpers.paths import REPO
from tests.helpers.receivers import (
    SCHEMA_PATH,
    FhirServer,
    Hl7Receiver,
    WebhookReceiver,
    write_sample,
)
from tests.helpers.servers import Agent, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def receivers() -> Iterator[tuple[Hl7Receiver, FhirServer, WebhookReceiver]]:
    hl7, fhir, hook = Hl7Receiver(), FhirServer(), WebhookReceiver()
    fhir.start()
    hook.start()
    try:
        yield hl7, fhir, hook
    finally:
        hl7.stop()
        fhir.stop()
        hook.stop()


def _config(hl7: Hl7Receiver, fhir: FhirServer, hook: WebhookReceiver) -> str:
    return f"""
[notify]
backoff_initial_s = 1
backoff_max_s = 2
timeout_s = 5

[[notify.notifiers]]
kind = "hl7"
name = "ris"
host = "127.0.0.1"
port = {hl7.port}
receiving_application = "RIS"
receiving_facility = "RADIOLOGY"

[[notify.notifiers]]
kind = "fhir"
name = "fhir"
base_url = "{fhir.url}/fhir"
token = "{fhir.token}"

[[notify.notifiers]]
kind = "webhook"
name = "worklist"
url = "{hook.url}/hooks/pacs-agent"
secret = "{hook.secret}"
"""


def _cli(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent", *args],
        env=agent.env(),
        cwd=agent.workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _rows(agent: Agent) -> list[Notification]:
    engine = make_engine(f"sqlite:///{agent.data_dir / 'pacs-agent.db'}")
    try:
        with make_session_factory(engine)() as s:
            return list(s.scalars(select(Notification).order_by(Notification.id)))
    finally:
        engine.dispose()


def test_serve_processes_a_ct_study_and_each_worklist_receiver_gets_its_message(
    tmp_path: Path, receivers: tuple[Hl7Receiver, FhirServer, WebhookReceiver]
) -> None:
    hl7, fhir, hook = receivers
    agent = Agent(
        workdir=tmp_path / "agent", port=free_port(), config_toml=_config(hl7, fhir, hook)
    )
    agent.start()
    try:
        study_uid, files = small_study(tmp_path, seed=1401)
        send_study(files, agent.port)

        def waiting_for_ris() -> bool:
            rows = {r.notifier: r for r in _rows(agent)}
            ris = rows.get("ris")
            return ris is not None and ris.attempts >= 1 and ris.state != "sent"

        try:
            wait_for(waiting_for_ris, 240, "the HL7 notification to fail while the RIS is down")
            wait_for(lambda: hook.received and fhir.received, 60, "the webhook and FHIR messages")
        except TimeoutError:
            pytest.fail(f"{[vars(r) for r in _rows(agent)]}\n{agent.log_tail()}")
        ris = next(r for r in _rows(agent) if r.notifier == "ris")
        assert ris.last_error is not None and "Connection" in ris.last_error
        hl7.start()  # the RIS comes up: the sweep sends the waiting notification again
        try:
            wait_for(lambda: hl7.received, 60, "the HL7 message once the RIS is up")
            wait_for(
                lambda: all(r.state == "sent" for r in _rows(agent)), 30, "every row to be sent"
            )
        except TimeoutError:
            pytest.fail(f"{[vars(r) for r in _rows(agent)]}\n{agent.log_tail()}")

        rows = _rows(agent)
        assert sorted((r.notifier, r.event, r.state) for r in rows) == [
            ("fhir", "findings", "sent"),
            ("ris", "findings", "sent"),
            ("worklist", "findings", "sent"),
        ]
        assert {r.notifier: r.response for r in rows} == {
            "ris": "AA",
            "fhir": "200",
            "worklist": "200",
        }

        findings = _cli(agent, "findings", study_uid, "--json")
        assert findings.returncode == 0, findings.stderr
        found = json.loads(findings.stdout)
        flag = found[0]["study_ai_flag"]
        assert flag in ("positive", "critical") and any(f["flag"] for f in found)

        (message,) = hl7.messages()
        order = message.oru_r01_patient_result.oru_r01_order_observation
        obx = {o.obx.obx_3.ce_1.to_er7(): o.obx for o in order.oru_r01_observation}
        assert obx["110180"].obx_5.to_er7() == study_uid
        assert obx["AI-FLAG"].obx_5.to_er7().split("^")[0] == flag
        blob = obx["4147007"]  # the demo model's segment: SNOMED CT "Mass"
        assert blob.obx_6.ce_1.to_er7() == "mm3"
        assert float(blob.obx_5.to_er7()) == pytest.approx(found[0]["volume_mm3"], rel=1e-5)

        (bundle,) = fhir.received
        report = bundle["entry"][0]["resource"]
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
        (doc,) = hook.received
        assert doc["study"]["study_instance_uid"] == study_uid
        assert doc["ai_flag"]["study"] == flag

        listed = _cli(agent, "notify", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {r["state"] for r in json.loads(listed.stdout)} == {"sent"}

        if os.environ.get("PACS_AGENT_WRITE_SAMPLES") == "1":
            write_sample("hl7", hl7.received[0].replace("\r", "\n"), "text")
            write_sample("fhir", json.dumps(bundle, indent=2), "json")
            write_sample("webhook", json.dumps(doc, indent=2), "json")
    finally:
        agent.stop()
    log = agent.log_tail(200_000)
    assert "ORCH-1401" not in log  # the Patient ID is in the messages, never in the log


def test_a_job_the_ai_cannot_process_reaches_the_webhook_and_fhir_as_failed(
    tmp_path: Path, receivers: tuple[Hl7Receiver, FhirServer, WebhookReceiver]
) -> None:
    hl7, fhir, hook = receivers
    # Past its soft time limit a job fails for good (Celery checks about once a second: a
    # study of a few seconds' work is sure to be caught).
    config = (
        _config(hl7, fhir, hook)
        + """
[models.time_limits.demo_ct_blob_seg]
soft_s = 0.01
hard_s = 60
"""
    )
    agent = Agent(workdir=tmp_path / "agent", port=free_port(), config_toml=config)
    agent.start()
    try:
        study_uid, files = small_study(tmp_path, seed=1402, slices=48, size=256)
        send_study(files, agent.port)
        try:
            wait_for(lambda: hook.received and fhir.received, 240, "the failed notifications")
            wait_for(lambda: {r.state for r in _rows(agent)} == {"sent"}, 30, "the rows to be sent")
        except TimeoutError:
            pytest.fail(f"{[vars(r) for r in _rows(agent)]}\n{agent.log_tail()}")
        context = (
            f"rows: {[vars(r) for r in _rows(agent)]}\nwebhook: {hook.received}\n{agent.log_tail()}"
        )
        # HL7 wants findings only (its default events): two rows, no HL7 message.
        assert sorted((r.notifier, r.event) for r in _rows(agent)) == [
            ("fhir", "failed"),
            ("worklist", "failed"),
        ], context
        assert not hl7.received, context
        assert len(hook.received) == 1 and len(fhir.received) == 1, context
        doc = hook.received[0]
        assert doc["event"] == "failed" and doc["study"]["study_instance_uid"] == study_uid
        assert doc["job"]["status"] == "failed", context
        # The reason names the step and the time limit (workers.outcome), never a Python class.
        reason = doc["job"]["reason"]
        assert reason.startswith("running model demo_ct_blob_seg: time limit"), context
        report = fhir.received[0]["entry"][0]["resource"]
        assert report["status"] == "cancelled" and reason in report["conclusion"]
    finally:
        agent.stop()


def _sample(name: str) -> str:
    text = (REPO / "docs" / "integration.md").read_text()
    match = re.search(
        rf"<!-- sample:{name} -->\n```\w+\n(.*?)\n```\n<!-- /sample:{name} -->", text, re.S
    )
    assert match, f"docs/integration.md has no {name} sample"
    return match.group(1)


def test_the_samples_in_docs_integration_are_messages_as_sent() -> None:
    oru = parse_message(_sample("hl7").replace("\n", "\r"), find_groups=True)
    assert oru.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and oru.msh.msh_12.to_er7() == "2.5.1"
    bundle = json.loads(_sample("fhir"))
    Bundle.model_validate(bundle)
    assert bundle["entry"][0]["resource"]["resourceType"] == "DiagnosticReport"
    jsonschema.validate(json.loads(_sample("webhook")), json.loads(SCHEMA_PATH.read_text()))
