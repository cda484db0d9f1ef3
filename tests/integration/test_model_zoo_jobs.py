"""Jobs through the running service: a radiograph sent over DICOM is classified by the demo
bundle (finding, probability and flag in the database, a TID 1500 SR), and a series the volume
checks refuse fails its job with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from pacs_agent.db.models import Finding, Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from tests.helpers.realct import REAL_CT_DIR, repair_real_ct
from tests.helpers.servers import Agent, free_port, wait_for

pytestmark = pytest.mark.integration


def _send(agent: Agent, files: list[Path]) -> None:
    """C-STORE ``files`` as they are (their own transfer syntaxes) with pynetdicom."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="TESTSCU")
    for ds in datasets:
        contexts = {(c.abstract_syntax, tuple(c.transfer_syntax)) for c in ae.requested_contexts}
        key = (ds.SOPClassUID, (ds.file_meta.TransferSyntaxUID,))
        if key not in contexts:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", agent.port, ae_title=agent.ae_title)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, hex(status.Status)
    finally:
        assoc.release()


def _finished(agent: Agent, study_uid: str) -> tuple[Job, list[Finding]] | None:
    sf = make_session_factory(make_engine(f"sqlite:///{agent.data_dir}/pacs-agent.db"))
    with sf() as s:
        job = s.scalars(
            select(Job).join(Study).where(Study.study_instance_uid == study_uid)
        ).first()
        if job is None or job.status not in ("succeeded", "exported", "failed"):
            return None
        return job, list(s.scalars(select(Finding).where(Finding.job_id == job.id)))


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    server = Agent(workdir=tmp_path / "agent", port=free_port())
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def test_radiograph_sent_over_dicom_is_classified_and_its_finding_recorded(
    agent: Agent, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    ds = radiograph_dataset(
        make_radiograph(rng, True), patient_id="JOBCR1", modality="CR", monochrome1=True
    )
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    _send(agent, [path])
    job, findings = wait_for(
        lambda: _finished(agent, ds.StudyInstanceUID), 180, "the classification job"
    )
    assert job.status == "succeeded", job.reason
    assert job.model_name == "demo_cr_nodule_cls"
    assert job.seg_path is None and job.sr_path is not None
    (finding,) = findings
    assert (finding.label, finding.code_value, finding.code_scheme) == ("Nodule", "27925004", "SCT")
    assert finding.probability is not None and finding.probability > 0.5
    assert finding.flag
    sr = pydicom.dcmread(agent.data_dir / "results" / job.sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"


def test_real_cr_without_patient_id_study_id_and_study_date_is_classified_and_reported(
    agent: Agent, tmp_path: Path
) -> None:
    """An older (or de-identified) radiograph that leaves type 2 attributes out: the job
    succeeds and its SR writes them empty, as the standard allows."""
    original = get_testdata_file("dicomdirtests/77654033/CR1/6154", download=False)
    assert isinstance(original, str)
    ds = pydicom.dcmread(original)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    for keyword in ("PatientID", "StudyID", "StudyDate"):
        del ds[keyword]
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    _send(agent, [path])
    job, findings = wait_for(
        lambda: _finished(agent, ds.StudyInstanceUID), 180, "the classification job"
    )
    assert job.status == "succeeded", job.reason
    assert [f.label for f in findings] == ["Nodule"]
    assert job.sr_path is not None
    sr = pydicom.dcmread(agent.data_dir / "results" / job.sr_path)
    assert sr.PatientID == "" and sr.StudyID == "" and sr.StudyDate == ""
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientName == ds.PatientName


def test_series_with_a_missing_slice_fails_its_job_with_the_reason(
    agent: Agent, tmp_path: Path
) -> None:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"{REAL_CT_DIR} is missing")
    files = repair_real_ct(REAL_CT_DIR, tmp_path / "ct")
    order = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    sent = [p for p in order if p != order[10]]
    _send(agent, sent)
    study_uid = pydicom.dcmread(sent[0]).StudyInstanceUID
    job, findings = wait_for(lambda: _finished(agent, study_uid), 180, "the CT job")
    assert job.status == "failed"
    assert job.reason is not None and "missing slices: 1 slice(s) absent" in job.reason
    assert job.reason.startswith("running model demo_ct_blob_seg: ")  # the step, no class name
    assert findings == []
