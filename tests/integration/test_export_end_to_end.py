"""Export through the running service: ``pacs-agent serve`` with its embedded worker sends a
study's results to a real Orthanc that goes down after sending the study.

- The PACS comes back on the same storage while the io task retries: the job ends exported
  and the PACS holds one SEG and one SR.
- The PACS stays down past the attempt limit: the job ends export_failed with the reason;
  ``pacs-agent retry JOB`` once it is back exports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Export, Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study
from tests.helpers.servers import Agent, Orthanc, free_port, wait_for

pytestmark = pytest.mark.integration

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Site:
    orthanc: Orthanc
    agent: Agent
    workdir: Path

    @cached_property
    def sf(self) -> sessionmaker[Session]:
        return make_session_factory(make_engine(f"sqlite:///{self.agent.data_dir}/pacs-agent.db"))

    def job(self, study_uid: str) -> Job | None:
        with self.sf() as s:
            return s.scalars(
                select(Job).join(Study).where(Study.study_instance_uid == study_uid)
            ).first()

    def exports(self, job_id: int) -> list[Export]:
        with self.sf() as s:
            return list(s.scalars(select(Export).where(Export.job_id == job_id)))

    def wait_status(self, study_uid: str, statuses: set[str], timeout: float = 240) -> Job:
        try:
            job: Job = wait_for(
                lambda: j if (j := self.job(study_uid)) and j.status in statuses else None,
                timeout,
                f"the job of study {study_uid} to be {statuses}",
                interval=0.5,
            )
        except TimeoutError:
            pytest.fail(f"job: {self.job(study_uid)}; agent log:\n{self.agent.log_tail()}")
        return job


def _site(workdir: Path, **export: object) -> Site:
    agent_port = free_port()
    orthanc = Orthanc(
        workdir=workdir / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        modalities={"agent": ["PACSAGENT", "127.0.0.1", agent_port]},
    )
    destinations = [
        {
            "name": "orthanc",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
    ]
    env = {"PACS_AGENT_EXPORT__DESTINATIONS": json.dumps(destinations)}
    env.update({f"PACS_AGENT_EXPORT__{k.upper()}": str(v) for k, v in export.items()})
    return Site(
        orthanc, Agent(workdir=workdir / "agent", port=agent_port, env_overrides=env), workdir
    )


@pytest.fixture
def patient_pacs(tmp_path: Path) -> Iterator[Site]:
    """The PACS is retried for up to about a minute."""
    site = _site(tmp_path, max_attempts=60, backoff_initial_s=0.5, backoff_max_s=1, timeout_s=5)
    site.orthanc.start()
    try:
        site.agent.start()
        yield site
    finally:
        site.agent.stop()
        site.orthanc.stop()


@pytest.fixture
def impatient_pacs(tmp_path: Path) -> Iterator[Site]:
    """Two attempts only."""
    site = _site(tmp_path, max_attempts=2, backoff_initial_s=0.5, backoff_max_s=1, timeout_s=5)
    site.orthanc.start()
    try:
        site.agent.start()
        yield site
    finally:
        site.agent.stop()
        site.orthanc.stop()


def _push_then_stop(site: Site, seed: int) -> tuple[str, int]:
    """Orthanc sends a synthetic study to the agent, then goes down. (study UID, instances)"""
    datasets, _ = make_ct_study_with_truth(None, seed=seed, patient_id=f"EXPORT-{seed}")
    files = write_study(datasets, site.workdir / "study")
    study_ids = {site.orthanc.upload(f)["ParentStudy"] for f in files}
    site.orthanc.post_json(
        "/modalities/agent/store", {"Resources": list(study_ids), "Synchronous": True}
    )
    site.orthanc.stop()
    return str(datasets[0].StudyInstanceUID), len(files)


def _results_held(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs Orthanc holds for the study, by SOP class."""
    held: dict[str, list[str]] = {}
    for found in orthanc.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    ):
        tags = orthanc.get(f"/instances/{found}/simplified-tags")
        held.setdefault(tags["SOPClassUID"], []).append(tags["SOPInstanceUID"])
    return held


def test_pacs_down_during_export_comes_back_and_the_service_exports_once(
    patient_pacs: Site,
) -> None:
    site = patient_pacs
    study_uid, sent = _push_then_stop(site, seed=501)
    job = site.wait_status(study_uid, {"exporting", "export_failed", "exported", "failed"})
    wait_for(
        lambda: any(e.status == "failed" for e in site.exports(job.id)),
        240,
        "a failed export attempt while the PACS is down",
        interval=0.5,
    )
    site.orthanc.start()
    job = site.wait_status(study_uid, {"exported", "export_failed", "failed"})
    assert job.status == "exported", f"{job.reason}\n{site.agent.log_tail()}"
    held = _results_held(site.orthanc, study_uid)
    assert held[SEG_STORAGE] == [job.seg_sop_instance_uid]
    assert held[COMPREHENSIVE_3D_SR] == [job.sr_sop_instance_uid]
    assert sum(len(v) for v in held.values()) == sent + 2
    attempts = site.exports(job.id)
    assert max(e.attempt for e in attempts) >= 2
    assert {e.sop_instance_uid for e in attempts if e.status == "sent"} == {
        job.seg_sop_instance_uid,
        job.sr_sop_instance_uid,
    }


def test_pacs_down_past_the_limit_is_export_failed_and_the_retry_command_exports(
    impatient_pacs: Site,
) -> None:
    site = impatient_pacs
    study_uid, sent = _push_then_stop(site, seed=502)
    job = site.wait_status(study_uid, {"export_failed", "exported", "failed"})
    assert job.status == "export_failed", job.reason
    assert job.reason is not None and job.reason.startswith("orthanc: 2 attempt(s), last error:")
    assert sorted({e.attempt for e in site.exports(job.id)}) == [1, 2]
    site.orthanc.start()
    retry = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "retry", str(job.id)],
        env=site.agent.env(),
        cwd=site.agent.workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    job = site.wait_status(study_uid, {"exported", "export_failed"}, timeout=120)
    assert job.status == "exported", job.reason
    held = _results_held(site.orthanc, study_uid)
    assert held[SEG_STORAGE] == [job.seg_sop_instance_uid]
    assert held[COMPREHENSIVE_3D_SR] == [job.sr_sop_instance_uid]
    assert sum(len(v) for v in held.values()) == sent + 2
