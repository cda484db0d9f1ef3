"""Gantry tilt and failure notices end to end: Orthanc pushes a study to ``pacs-agent serve``
(embedded broker and worker, the demo CT bundle) and gets the results back over DICOM.

- A gantry-tilted CT (18.5 degrees; derived from the real 20-slice CT, see
  tests/helpers/tilted.py: not a real tilted acquisition) is resampled for the model: a SEG
  and an SR land in Orthanc, the SEG's frames cover the burned-in sphere on the acquired tilted
  frames, and the SR says that the input was resampled.
- The same series with a slice missing cannot be corrected: the job fails with the reason, and
  the failure notice SR saying so lands in Orthanc.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from sqlalchemy import select

from pacs_agent.db.models import Export, Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.servers import Agent, Orthanc, orthanc_and_agent, wait_for
from tests.helpers.tilted import pixel_centres, write_tilted_study

pytestmark = pytest.mark.integration

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Site:
    orthanc: Orthanc
    agent: Agent
    workdir: Path

    def push(self, files: list[Path]) -> str:
        study_ids = {self.orthanc.upload(f)["ParentStudy"] for f in files}
        assert len(study_ids) == 1
        (study_id,) = study_ids
        self.orthanc.post_json(
            "/modalities/agent/store", {"Resources": [study_id], "Synchronous": True}
        )
        return str(study_id)

    def job(self, study_uid: str) -> Job | None:
        sf = make_session_factory(make_engine(f"sqlite:///{self.agent.data_dir}/pacs-agent.db"))
        with sf() as s:
            return s.scalars(
                select(Job).join(Study).where(Study.study_instance_uid == study_uid)
            ).first()

    def exports(self, job_id: int) -> list[Export]:
        sf = make_session_factory(make_engine(f"sqlite:///{self.agent.data_dir}/pacs-agent.db"))
        with sf() as s:
            return list(s.scalars(select(Export).where(Export.job_id == job_id)))

    def wait_job(self, study_uid: str, statuses: set[str], timeout: float = 400) -> Job:
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

    def instances(self, study_id: str, sop_class: str) -> list[Path]:
        """Orthanc's files of the study's instances of ``sop_class``, fetched into workdir."""
        found: list[Path] = []
        for inst in self.orthanc.get(f"/studies/{study_id}/instances"):
            tags = self.orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
            if tags["SOPClassUID"] == sop_class:
                path = self.workdir / f"{inst['ID']}.dcm"
                path.write_bytes(self.orthanc.request("GET", f"/instances/{inst['ID']}/file"))
                found.append(path)
        return found


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("tilt")
    with orthanc_and_agent(workdir) as (orthanc, agent):
        yield Site(orthanc, agent, workdir)


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


def _texts(content: Any) -> list[str]:
    """Every TEXT value of an SR content tree."""
    found: list[str] = []
    for item in content:
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        if "ContentSequence" in item:
            found += _texts(item.ContentSequence)
    return found


def test_a_tilted_ct_is_resampled_and_its_seg_and_sr_land_in_orthanc(site: Site) -> None:
    files, sphere, sources = write_tilted_study(site.workdir, "tilted")
    study_id = site.push(files)
    job = site.wait_job(str(sources[0].StudyInstanceUID), {"exported", "export_failed", "failed"})
    assert job.status == "exported", f"{job.reason}\n{site.agent.log_tail()}"

    (seg_path,) = wait_for(lambda: site.instances(study_id, SEG_STORAGE), 30, "the SEG")
    (sr_path,) = site.instances(study_id, COMPREHENSIVE_3D_SR)
    assert _dciodvfy_errors(seg_path) == [] and _dciodvfy_errors(sr_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.SOPInstanceUID == job.seg_sop_instance_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    # The sphere, known in patient coordinates, is covered on the acquired tilted frames.
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    truth = np.stack([sphere.contains(pixel_centres(ds)) for ds in sources])
    covered = float(np.logical_and(pixels > 0, truth).sum()) / float(truth.sum())
    assert covered > 0.9

    sr = hd.sr.srread(sr_path)
    assert sr.SOPInstanceUID == job.sr_sop_instance_uid
    notes = [t for t in _texts(sr.ContentSequence) if t.startswith("input resampled")]
    assert notes and "gantry tilt of 18.5 degrees" in notes[0]


def test_a_series_that_cannot_be_corrected_fails_and_orthanc_gets_the_failure_notice(
    site: Site,
) -> None:
    files, _, sources = write_tilted_study(site.workdir, "gap", drop=(10,))
    study_id = site.push(files)
    study_uid = str(sources[0].StudyInstanceUID)
    job = site.wait_job(study_uid, {"exported", "export_failed", "failed"})
    assert job.status == "failed"
    assert job.reason is not None and "missing slices: 1 slice(s) absent" in job.reason

    (notice_path,) = wait_for(
        lambda: site.instances(study_id, COMPREHENSIVE_3D_SR), 60, "the failure notice"
    )
    job = site.wait_job(study_uid, {"failed"})  # the notice is recorded on the job
    assert job.seg_sop_instance_uid is None and job.sr_sop_instance_uid is not None
    assert site.instances(study_id, SEG_STORAGE) == []
    assert _dciodvfy_errors(notice_path) == []
    notice = hd.sr.srread(notice_path)
    assert notice.SOPInstanceUID == job.sr_sop_instance_uid
    assert notice.SeriesDescription.startswith("AI NOT PROCESSED: demo_ct_blob_seg 0.1.0")
    assert notice.StudyInstanceUID == study_uid
    (text,) = [
        str(item.TextValue)
        for item in notice.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121106"  # DCM Comment
    ]
    assert text.startswith("AI processing not performed: the model demo_ct_blob_seg 0.1.0")
    assert "missing slices: 1 slice(s) absent" in text
    wait_for(
        lambda: [e for e in site.exports(job.id) if e.status == "sent"],
        30,
        "the notice's export row",
    )
    final = site.job(study_uid)
    assert final is not None and final.status == "failed"
