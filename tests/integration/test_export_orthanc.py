"""Export against a real Orthanc: C-STORE and STOW-RS (DICOMweb plugin), retries with backoff
while the PACS is down, export_failed with a reason, a retry by command, and never a duplicate.

The job's SEG and SR are real objects built from the dcmqi liver CT; the database is a real
SQLite file (one test runs on PostgreSQL).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import Settings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Export, Job, Series, Study, utcnow
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.dicom.io import write_dataset
from pacs_agent.dicom.seg import build_segmentation
from pacs_agent.dicom.sr import build_measurement_report
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.export import export_job, exports_of, requeue_export
from tests.helpers.dicom_results import LIVER_CT_DIR, SPECS, box_mask, job_result, liver_ct
from tests.helpers.servers import Orthanc, free_port, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Results:
    seg_uid: str
    sr_uid: str
    seg_rel: str
    sr_rel: str
    study_uid: str


def _write_results(results_dir: Path) -> Results:
    sources: list[Dataset] = liver_ct()
    mask = box_mask(sources, label=1)
    result = job_result(sources, segment_results(mask, sources, SPECS))
    seg = build_segmentation(sources, mask, result)
    assert seg is not None
    sr = build_measurement_report(sources, seg, result)
    study_uid = str(sources[0].StudyInstanceUID)
    seg_rel = f"{study_uid}/1/SEG_{seg.SOPInstanceUID}.dcm"
    sr_rel = f"{study_uid}/1/SR_{sr.SOPInstanceUID}.dcm"
    write_dataset(seg, results_dir / seg_rel)
    write_dataset(sr, results_dir / sr_rel)
    return Results(str(seg.SOPInstanceUID), str(sr.SOPInstanceUID), seg_rel, sr_rel, study_uid)


def _exporting_job(sf: sessionmaker[Session], results: Results) -> int:
    sources = liver_ct()
    with sf.begin() as s:
        study = Study(study_instance_uid=results.study_uid, status="complete")
        s.add(study)
        s.flush()
        series = Series(
            study_id=study.id, series_instance_uid=str(sources[0].SeriesInstanceUID), modality="CT"
        )
        s.add(series)
        s.flush()
        job = Job(
            study_id=study.id,
            series_id=series.id,
            model_name="spleen_ct_segmentation",
            model_version="0.5.1",
            status=JobStatus.EXPORTING.value,
            started_at=utcnow(),
            seg_path=results.seg_rel,
            sr_path=results.sr_rel,
            seg_sop_instance_uid=results.seg_uid,
            sr_sop_instance_uid=results.sr_uid,
        )
        s.add(job)
        s.flush()
        return job.id


def _settings(data_dir: Path, destinations: list[dict[str, Any]], **export: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        export={
            "destinations": destinations,
            "timeout_s": 10,
            "backoff_initial_s": 0.5,
            "backoff_factor": 2,
            "backoff_max_s": 1,
            **export,
        },
    )


def _dicom(orthanc: Orthanc, name: str = "pacs") -> dict[str, Any]:
    return {"name": name, "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _held(orthanc: Orthanc, sop_uid: str) -> int:
    """How many instances with this SOP Instance UID Orthanc holds."""
    found = orthanc.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    )
    return len(found)


def _study_instances(orthanc: Orthanc, study_uid: str) -> int:
    found = orthanc.post_json(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}},
    )
    return len(found)


@dataclass
class Env:
    settings_dir: Path
    sf: sessionmaker[Session]
    results: Results
    job_id: int


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'pacs-agent.db'}"
    upgrade(url)
    engine = make_engine(url)
    sf = make_session_factory(engine)
    results = _write_results(data_dir / "results")
    yield Env(data_dir, sf, results, _exporting_job(sf, results))
    engine.dispose()


def _job(sf: sessionmaker[Session], job_id: int) -> Job:
    with sf() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _attempts(sf: sessionmaker[Session], job_id: int) -> list[Export]:
    with sf() as s:
        return exports_of(s, job_id)


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(
        workdir=tmp_path / "orthanc-web",
        dicom_port=free_port(),
        http_port=free_port(),
        dicomweb=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_export_to_a_dicom_and_a_stow_rs_destination_records_each_object_and_leaves_one_copy(
    env: Env, dicomweb_orthanc: Orthanc
) -> None:
    orthanc = dicomweb_orthanc
    settings = _settings(
        env.settings_dir,
        [
            _dicom(orthanc, "pacs"),
            {"kind": "dicomweb", "name": "web", "url": orthanc.dicomweb_url},
        ],
    )
    assert export_job(settings, env.sf, env.job_id) == "exported"
    job = _job(env.sf, env.job_id)
    assert job.status == "exported" and job.reason is None
    rows = _attempts(env.sf, env.job_id)
    by_destination = {(r.destination, r.sop_instance_uid): r for r in rows}
    assert len(rows) == 4
    for destination in ("pacs", "web"):
        for uid in (env.results.seg_uid, env.results.sr_uid):
            row = by_destination[(destination, uid)]
            assert (row.status, row.attempt, row.dicom_status, row.error) == ("sent", 1, 0, None)
    # Delivered twice (C-STORE, then STOW-RS) with the same UIDs: one copy of each.
    assert _held(orthanc, env.results.seg_uid) == 1
    assert _held(orthanc, env.results.sr_uid) == 1
    assert _study_instances(orthanc, env.results.study_uid) == 2
    # STOW-RS really went through the DICOMweb plugin: it answers QIDO-RS for the SR.
    qido = orthanc.get(f"/dicom-web/studies/{env.results.study_uid}/instances")
    assert {item["00080018"]["Value"][0] for item in qido} == {
        env.results.seg_uid,
        env.results.sr_uid,
    }


def test_stow_rs_rejected_by_the_server_is_recorded_with_its_http_status(
    env: Env, dicomweb_orthanc: Orthanc
) -> None:
    settings = _settings(
        env.settings_dir,
        [{"kind": "dicomweb", "name": "web", "url": dicomweb_orthanc.url + "/no-such-root"}],
        max_attempts=2,
    )
    assert export_job(settings, env.sf, env.job_id, sleep=lambda s: None) == "export_failed"
    job = _job(env.sf, env.job_id)
    assert job.reason is not None and "web: 2 attempt(s)" in job.reason and "HTTP 404" in job.reason
    rows = _attempts(env.sf, env.job_id)
    assert [(r.attempt, r.status) for r in rows] == [(1, "failed")] * 2 + [(2, "failed")] * 2


def test_pacs_stopped_during_an_export_comes_back_and_the_job_ends_exported_without_duplicates(
    env: Env, orthanc: Orthanc
) -> None:
    settings = _settings(env.settings_dir, [_dicom(orthanc)], max_attempts=30)
    # A first, complete export: the PACS holds the SEG and the SR.
    assert export_job(settings, env.sf, env.job_id) == "exported"
    assert _study_instances(orthanc, env.results.study_uid) == 2
    # The job runs again (a reprocess with the same model: same UIDs) and its export starts
    # while the PACS is down; the PACS comes back on the same storage during the backoff.
    orthanc.stop()
    with env.sf.begin() as s:
        job = s.get(Job, env.job_id)
        assert job is not None
        job.status = JobStatus.EXPORTING.value
        job.started_at = utcnow()
    outcome: list[str] = []
    worker = threading.Thread(
        target=lambda: outcome.append(export_job(settings, env.sf, env.job_id)), daemon=True
    )
    worker.start()
    wait_for(
        lambda: any(r.status == "failed" for r in _attempts(env.sf, env.job_id)),
        30,
        "a failed attempt while the PACS is down",
    )
    orthanc.start()
    worker.join(60)
    assert outcome == ["exported"]
    rows = _attempts(env.sf, env.job_id)
    failed = [r for r in rows if r.status == "failed"]
    assert failed and all("connection failed" in (r.error or "") for r in failed)
    last_round = [r for r in rows if r.attempt > 1 and r.status == "sent"]
    assert {r.sop_instance_uid for r in last_round} == {env.results.seg_uid, env.results.sr_uid}
    assert _held(orthanc, env.results.seg_uid) == 1
    assert _held(orthanc, env.results.sr_uid) == 1
    assert _study_instances(orthanc, env.results.study_uid) == 2


def test_a_destination_that_stays_down_ends_export_failed_and_a_retry_succeeds_once_it_is_up(
    env: Env, tmp_path: Path
) -> None:
    pacs = Orthanc(workdir=tmp_path / "late-pacs", dicom_port=free_port(), http_port=free_port())
    settings = _settings(env.settings_dir, [_dicom(pacs, "late")], max_attempts=3)
    waits: list[float] = []
    assert export_job(settings, env.sf, env.job_id, sleep=waits.append) == "export_failed"
    assert waits == [0.5, 1.0]  # exponential backoff, capped at backoff_max_s
    job = _job(env.sf, env.job_id)
    assert job.status == "export_failed"
    assert job.reason is not None
    assert job.reason.startswith("late: 3 attempt(s), last error: no association with ORTHANC@")
    rows = _attempts(env.sf, env.job_id)
    assert sorted({r.attempt for r in rows}) == [1, 2, 3]
    assert all(r.status == "failed" and r.destination == "late" and r.error for r in rows)
    # Only a job in export_failed can be requeued.
    assert not requeue_export(env.sf, env.job_id + 1, utcnow())
    pacs.start()
    try:
        assert requeue_export(env.sf, env.job_id, utcnow())
        assert _job(env.sf, env.job_id).status == "exporting"
        assert export_job(settings, env.sf, env.job_id) == "exported"
        job = _job(env.sf, env.job_id)
        assert job.status == "exported" and job.reason is None
        assert not requeue_export(env.sf, env.job_id, utcnow())
        assert _study_instances(pacs, env.results.study_uid) == 2
    finally:
        pacs.stop()


def test_a_new_round_skips_the_destinations_that_already_hold_every_object(
    env: Env, orthanc: Orthanc, tmp_path: Path
) -> None:
    down = Orthanc(workdir=tmp_path / "down", dicom_port=free_port(), http_port=free_port())
    settings = _settings(
        env.settings_dir, [_dicom(orthanc, "up"), _dicom(down, "down")], max_attempts=1
    )
    assert export_job(settings, env.sf, env.job_id) == "export_failed"
    reason = _job(env.sf, env.job_id).reason or ""
    assert reason.startswith("down: 1 attempt(s)") and "up:" not in reason
    down.start()
    try:
        assert requeue_export(env.sf, env.job_id, utcnow())
        assert export_job(settings, env.sf, env.job_id) == "exported"
    finally:
        down.stop()
    rows = _attempts(env.sf, env.job_id)
    assert [r.destination for r in rows if r.status == "sent"].count("up") == 2
    assert [r.destination for r in rows if r.status == "sent"].count("down") == 2


def test_export_records_attempts_in_postgresql(postgres_url: str, orthanc: Orthanc) -> None:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        sf = make_session_factory(engine)
        data_dir = Path(orthanc.workdir).parent / "pg-var"
        results = _write_results(data_dir / "results")
        job_id = _exporting_job(sf, results)
        settings = _settings(data_dir, [_dicom(orthanc)])
        assert export_job(settings, sf, job_id) == "exported"
        with sf() as s:
            statuses = s.scalars(select(Export.status).where(Export.job_id == job_id)).all()
        assert statuses == ["sent", "sent"]
    finally:
        engine.dispose()


def test_export_skips_a_job_that_is_not_exporting(env: Env) -> None:
    with env.sf.begin() as s:
        job = s.get(Job, env.job_id)
        assert job is not None
        job.status = JobStatus.CANCELLED.value
    settings = _settings(env.settings_dir, [])
    assert export_job(settings, env.sf, env.job_id) == f"skipped: job {env.job_id} is cancelled"
    assert LIVER_CT_DIR.is_dir()


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_export_over_dicom_tls_verifies_the_pacs_certificate(env: Env, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path / "tls", "pacs")
    other, _ = _self_signed(tmp_path / "tls", "other")
    pacs = Orthanc(
        workdir=tmp_path / "tls-pacs",
        dicom_port=free_port(),
        http_port=free_port(),
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(cert),
            "DicomTlsPrivateKey": str(key),
            "DicomTlsTrustedCertificates": str(cert),
            "DicomTlsRemoteCertificateRequired": False,
        },
    )
    pacs.start()
    try:
        # A CA that did not sign the PACS certificate: the handshake fails, nothing is sent.
        untrusted = _settings(
            env.settings_dir,
            [{**_dicom(pacs, "tls"), "tls": True, "tls_ca": str(other)}],
            max_attempts=1,
        )
        assert export_job(untrusted, env.sf, env.job_id) == "export_failed"
        assert "(TLS)" in (_job(env.sf, env.job_id).reason or "")
        assert _study_instances(pacs, env.results.study_uid) == 0
        # Plain DICOM to a TLS port fails as well.
        assert requeue_export(env.sf, env.job_id, utcnow())
        plain = _settings(env.settings_dir, [_dicom(pacs, "tls")], max_attempts=1)
        assert export_job(plain, env.sf, env.job_id) == "export_failed"
        # The right CA: stored.
        assert requeue_export(env.sf, env.job_id, utcnow())
        trusted = _settings(
            env.settings_dir,
            [{**_dicom(pacs, "tls"), "tls": True, "tls_ca": str(cert)}],
        )
        assert export_job(trusted, env.sf, env.job_id) == "exported"
        assert _held(pacs, env.results.seg_uid) == 1
        assert _held(pacs, env.results.sr_uid) == 1
    finally:
        pacs.stop()


def test_a_hung_pacs_killed_and_restarted_on_its_storage_ends_exported_without_duplicates(
    env: Env, orthanc: Orthanc
) -> None:
    settings = _settings(env.settings_dir, [_dicom(orthanc)], max_attempts=30, timeout_s=2)
    assert export_job(settings, env.sf, env.job_id) == "exported"
    # The PACS hangs (SIGSTOP: connections are accepted by the kernel, never answered), the
    # job's export starts again, and the PACS is then killed hard and started again.
    assert orthanc.proc is not None
    orthanc.proc.send_signal(signal.SIGSTOP)
    with env.sf.begin() as s:
        job = s.get(Job, env.job_id)
        assert job is not None
        job.status = JobStatus.EXPORTING.value
        job.started_at = utcnow()
    outcome: list[str] = []
    worker = threading.Thread(
        target=lambda: outcome.append(export_job(settings, env.sf, env.job_id)), daemon=True
    )
    worker.start()
    try:
        wait_for(
            lambda: any(r.status == "failed" for r in _attempts(env.sf, env.job_id)),
            30,
            "a failed attempt while the PACS hangs",
        )
    finally:
        orthanc.proc.kill()
        orthanc.proc.wait()
    orthanc.start()
    worker.join(60)
    assert outcome == ["exported"]
    assert _held(orthanc, env.results.seg_uid) == 1
    assert _held(orthanc, env.results.sr_uid) == 1
    assert _study_instances(orthanc, env.results.study_uid) == 2


def test_a_missing_result_file_ends_export_failed_with_the_reason(
    env: Env, orthanc: Orthanc
) -> None:
    (env.settings_dir / "results" / env.results.sr_rel).unlink()
    settings = _settings(env.settings_dir, [_dicom(orthanc)])
    assert export_job(settings, env.sf, env.job_id) == "export_failed"
    job = _job(env.sf, env.job_id)
    assert job.reason is not None
    assert job.reason.startswith("result file unreadable: FileNotFoundError")
    assert _study_instances(orthanc, env.results.study_uid) == 0


def test_stow_rs_authenticates_with_http_basic_and_a_wrong_password_is_refused(
    env: Env, tmp_path: Path
) -> None:
    pacs = Orthanc(
        workdir=tmp_path / "auth-pacs",
        dicom_port=free_port(),
        http_port=free_port(),
        dicomweb=True,
        http_user=("agent", "s3cret"),
    )
    pacs.start()
    try:

        def web(password: str) -> dict[str, Any]:
            return {
                "kind": "dicomweb",
                "name": "web",
                "url": pacs.dicomweb_url,
                "username": "agent",
                "password": password,
            }

        wrong = _settings(env.settings_dir, [web("wrong")], max_attempts=1)
        assert export_job(wrong, env.sf, env.job_id) == "export_failed"
        assert "HTTP 401" in (_job(env.sf, env.job_id).reason or "")
        assert requeue_export(env.sf, env.job_id, utcnow())
        right = _settings(env.settings_dir, [web("s3cret")], max_attempts=1)
        assert export_job(right, env.sf, env.job_id) == "exported"
        assert _study_instances(pacs, env.results.study_uid) == 2
    finally:
        pacs.stop()
