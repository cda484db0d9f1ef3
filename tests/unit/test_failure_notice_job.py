"""write_failure_notice on a real SQLite database and spool: a failed job gets its notice
recorded and stays failed; with ``export.failure_notices`` off nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import Settings
from pacs_agent.db.models import Base, Instance, Job, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.notices import send_failure_notice, write_failure_notice
from tests.helpers.dicom_results import LIVER_CT_DIR

REASON = "ModelInputError: series cannot be made into one volume: missing slices"


def _failed_job(tmp_path: Path, **export: object) -> tuple[Settings, sessionmaker[Session], int]:
    settings = Settings(
        data_dir=tmp_path / "var",
        export={
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
            ],
            **export,
        },
    )
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    sf = make_session_factory(engine)
    files = sorted(LIVER_CT_DIR.glob("*.dcm"))
    first = dcmread(files[0], stop_before_pixels=True)
    with sf.begin() as s:
        study = Study(study_instance_uid=str(first.StudyInstanceUID))
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=str(first.SeriesInstanceUID))
        s.add(series)
        s.flush()
        for n, f in enumerate(files):
            relative = Path("s") / f.name
            (settings.spool_dir / "s").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, settings.spool_dir / relative)
            s.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID),
                    sop_class_uid=str(first.SOPClassUID),
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(relative),
                    size_bytes=f.stat().st_size,
                    sha256=f"{n:064x}",
                )
            )
        job = Job(
            study_id=study.id,
            series_id=series.id,
            model_name="demo_ct_blob_seg",
            model_version="0.1.0",
            status="failed",
            reason=REASON,
        )
        s.add(job)
        s.flush()
        job_id = job.id
    return settings, sf, job_id


def test_a_failed_job_gets_its_notice_recorded_and_stays_failed(tmp_path: Path) -> None:
    settings, sf, job_id = _failed_job(tmp_path)
    queued: list[int] = []
    assert send_failure_notice(settings, sf, queued.append, job_id)
    assert queued == [job_id]
    with sf() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status == "failed" and job.reason == REASON
        assert job.sr_path is not None and job.seg_path is None
        notice = dcmread(settings.results_dir / job.sr_path)
    assert notice.SOPInstanceUID == job.sr_sop_instance_uid
    # Written again (another failure of the same job): the same UID, so the PACS replaces it.
    again = write_failure_notice(settings, sf, job_id)
    assert again is not None and dcmread(again).SOPInstanceUID == notice.SOPInstanceUID


@pytest.mark.parametrize("export", [{"failure_notices": False}, {"destinations": []}])
def test_no_notice_when_switched_off_or_nowhere_to_send(
    tmp_path: Path, export: dict[str, object]
) -> None:
    settings, sf, job_id = _failed_job(tmp_path, **export)
    queued: list[int] = []
    assert not send_failure_notice(settings, sf, queued.append, job_id)
    assert queued == []
    with sf() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.sr_path is None and job.sr_sop_instance_uid is None
    assert not settings.results_dir.exists() or not any(settings.results_dir.rglob("*.dcm"))
