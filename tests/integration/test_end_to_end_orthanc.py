"""End to end with a real PACS: Orthanc pushes a study to pacs-agent over DICOM; the agent runs
the demo MONAI bundle on the embedded broker and worker, and sends a SEG and a TID 1500 SR back
to Orthanc. Checked through Orthanc's REST API, dciodvfy and highdicom.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs_agent.db.models import Export, Finding, Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study
from tests.helpers.realct import REAL_CT_DIR, enhanced_real_ct, repair_real_ct
from tests.helpers.servers import Agent, Orthanc, orthanc_and_agent, wait_for

pytestmark = pytest.mark.integration

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Site:
    orthanc: Orthanc
    agent: Agent
    workdir: Path

    def push_study(self, files: list[Path]) -> str:
        """Upload to Orthanc, then have Orthanc C-STORE the study to the agent."""
        study_ids = {self.orthanc.upload(f)["ParentStudy"] for f in files}
        assert len(study_ids) == 1
        study_id = study_ids.pop()
        self.orthanc.post_json(
            "/modalities/agent/store", {"Resources": [study_id], "Synchronous": True}
        )
        return study_id

    def jobs(self, study_uid: str) -> list[Job]:
        sf = make_session_factory(make_engine(f"sqlite:///{self.agent.data_dir}/pacs-agent.db"))
        with sf() as s:
            return list(
                s.scalars(select(Job).join(Study).where(Study.study_instance_uid == study_uid))
            )

    def wait_for_job(self, study_uid: str, timeout: float = 300) -> Job:
        def done() -> Job | None:
            jobs = self.jobs(study_uid)
            if jobs and jobs[0].status in ("exported", "export_failed", "failed"):
                return jobs[0]
            return None

        try:
            job: Job = wait_for(done, timeout, f"the job of study {study_uid}", interval=0.5)
        except TimeoutError:
            pytest.fail(f"no finished job; agent log:\n{self.agent.log_tail()}")
        assert job.status == "exported", f"{job.status}: {job.reason}\n{self.agent.log_tail()}"
        return job


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("site")
    with orthanc_and_agent(workdir) as (orthanc, agent):
        yield Site(orthanc, agent, workdir)


def _results_in_orthanc(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    by_class: dict[str, list[dict[str, Any]]] = {}
    for inst in orthanc.get(f"/studies/{study_id}/instances"):
        tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
        by_class.setdefault(tags["SOPClassUID"], []).append({"id": inst["ID"], "tags": tags})
    return by_class


def _check_objects(
    site: Site, study_id: str, source_series_uid: str, job: Job, expect_seg: bool
) -> tuple[Any, Any]:
    orthanc = site.orthanc
    by_class = wait_for(
        lambda: (
            lambda r: r if COMPREHENSIVE_3D_SR in r and (SEG_STORAGE in r) == expect_seg else None
        )(_results_in_orthanc(orthanc, study_id)),
        30,
        "the SEG and the SR in Orthanc",
    )
    srs = by_class[COMPREHENSIVE_3D_SR]
    assert len(srs) == 1, "exactly one SR per job"
    sr_tags = srs[0]["tags"]
    assert sr_tags["SOPInstanceUID"] == job.sr_sop_instance_uid
    sr_path = site.workdir / "sr.dcm"
    sr_path.write_bytes(orthanc.request("GET", f"/instances/{srs[0]['id']}/file"))
    sr = hd.sr.srread(sr_path)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    _dciodvfy_clean(sr_path)
    seg = None
    if expect_seg:
        segs = by_class[SEG_STORAGE]
        assert len(segs) == 1, "exactly one SEG per job"
        seg_path = site.workdir / "seg.dcm"
        seg_path.write_bytes(orthanc.request("GET", f"/instances/{segs[0]['id']}/file"))
        seg = hd.seg.segread(seg_path)
        assert seg.SOPInstanceUID == job.seg_sop_instance_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series_uid
        _dciodvfy_clean(seg_path)
    return seg, sr


def _dciodvfy_clean(path: Path) -> None:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
    assert errors == [], "\n".join(errors)


def _findings(site: Site, job_id: int) -> list[Finding]:
    sf = make_session_factory(make_engine(f"sqlite:///{site.agent.data_dir}/pacs-agent.db"))
    with sf() as s:
        return list(s.scalars(select(Finding).where(Finding.job_id == job_id)))


def _exports(site: Site, job_id: int) -> list[Export]:
    sf = make_session_factory(make_engine(f"sqlite:///{site.agent.data_dir}/pacs-agent.db"))
    with sf() as s:
        return list(s.scalars(select(Export).where(Export.job_id == job_id)))


def test_synthetic_study_from_orthanc_comes_back_as_seg_and_sr(site: Site) -> None:
    datasets, truth = make_ct_study_with_truth(None, seed=101, patient_id="E2E-SYNTH")
    files = write_study(datasets, site.workdir / "synthetic")
    study_id = site.push_study(files)
    job = site.wait_for_job(str(datasets[0].StudyInstanceUID))

    findings = _findings(site, job.id)
    assert [f.label for f in findings] == ["Blob"] and findings[0].detected
    ps = [float(v) for v in datasets[0].PixelSpacing]
    true_volume = float(truth.sum()) * ps[0] * ps[1] * float(datasets[0].SliceThickness)
    assert findings[0].volume_mm3 == pytest.approx(true_volume, rel=0.25)

    seg, _ = _check_objects(
        site, study_id, str(datasets[0].SeriesInstanceUID), job, expect_seg=True
    )
    # The SEG's frames are on the source frames: compare with the truth per source instance.
    by_uid = {str(ds.SOPInstanceUID): truth[k] for k, ds in enumerate(datasets)}
    uids = list(by_uid)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    agree = sum(int(((pixels[i] > 0) == (by_uid[u] > 0)).sum()) for i, u in enumerate(uids))
    assert agree / truth.size > 0.99
    assert {e.status for e in _exports(site, job.id)} == {"sent"}


def test_real_ct_from_orthanc_comes_back_with_an_sr_and_the_seg_it_found(site: Site) -> None:
    files = repair_real_ct(REAL_CT_DIR, site.workdir / "realct")
    first = dcmread(files[0], stop_before_pixels=True)
    study_id = site.push_study(files)
    job = site.wait_for_job(str(first.StudyInstanceUID))
    findings = _findings(site, job.id)
    assert len(findings) == 1
    _check_objects(
        site, study_id, str(first.SeriesInstanceUID), job, expect_seg=findings[0].detected
    )
    assert job.model_version == "0.1.0"


def test_enhanced_ct_from_orthanc_comes_back_with_a_seg_on_its_source_frames(site: Site) -> None:
    """One multi-frame image (the real CT converted to a Legacy Converted Enhanced CT) goes
    the whole way: volume, model, labels on its frames, a SEG referencing those frames, SR."""
    path = enhanced_real_ct(site.workdir / "enhanced")
    multi = dcmread(path)
    study_id = site.push_study([path])
    job = site.wait_for_job(str(multi.StudyInstanceUID))
    findings = _findings(site, job.id)
    assert [f.label for f in findings] == ["Blob"]
    seg, _ = _check_objects(
        site, study_id, str(multi.SeriesInstanceUID), job, expect_seg=findings[0].detected
    )
    if seg is not None:
        frames = {
            (
                str(
                    item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                ),
                int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber),
            )
            for item in seg.PerFrameFunctionalGroupsSequence
        }
        assert {uid for uid, _ in frames} == {str(multi.SOPInstanceUID)}
        assert all(1 <= number <= int(multi.NumberOfFrames) for _, number in frames)
    assert {e.status for e in _exports(site, job.id)} == {"sent"}
