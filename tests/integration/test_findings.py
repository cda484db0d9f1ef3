"""Findings in the database per job, and ``pacs-agent findings STUDY_UID`` over them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacs_agent.cli.main import app
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Job, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.findings import findings_of_study, replace_findings
from tests.helpers.dicom_results import SPECS, box_mask, classifications, job_result, liver_ct

pytestmark = pytest.mark.integration


def _record(url: str, status: str = "exported") -> tuple[str, int]:
    """A job of the liver CT study that found the liver (not the spleen) and classified it."""
    upgrade(url)
    engine = make_engine(url)
    sf = make_session_factory(engine)
    ct = liver_ct()
    mask = box_mask(ct)
    result = job_result(
        ct, segment_results(mask, ct, SPECS), classifications=classifications(0.7, 0.1)
    )
    study_uid = str(ct[0].StudyInstanceUID)
    with sf.begin() as s:
        study = Study(study_instance_uid=study_uid, status="complete")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=str(ct[0].SeriesInstanceUID))
        s.add(series)
        s.flush()
        job = Job(
            study_id=study.id,
            series_id=series.id,
            model_name="spleen_ct_segmentation",
            model_version="0.5.1",
            status=status,
            seg_sop_instance_uid=result.uids.seg_sop_uid,
            sr_sop_instance_uid=result.uids.sr_sop_uid,
        )
        s.add(job)
        s.flush()
        job_id = job.id
        replace_findings(s, job_id, result)
    # A second run replaces the rows rather than adding to them.
    with sf.begin() as s:
        replace_findings(s, job_id, result)
    engine.dispose()
    return study_uid, job_id


def test_findings_command_lists_segments_and_classifications_of_a_study(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    study_uid, job_id = _record(f"sqlite:///{data_dir / 'pacs-agent.db'}")
    runner = CliRunner()
    env = {"PACS_AGENT_DATA_DIR": str(data_dir)}
    out = runner.invoke(app, ["findings", study_uid, "--json"], env=env)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    ct = liver_ct()
    liver, spleen = segment_results(box_mask(ct), ct, SPECS)
    summary = [
        (r["kind"], r["number"], r["label"], r["code_value"], r["flag"], r["probability"])
        for r in rows
    ]
    assert summary == [
        ("segment", 1, "liver", "10200004", True, None),
        ("segment", 2, "spleen", "78961009", False, None),
        ("classification", 1, "pneumothorax", "36118008", True, 0.7),
        ("classification", 2, "nodule", "27925004", False, 0.1),
    ]
    assert rows[0]["volume_mm3"] == pytest.approx(liver.volume_mm3)
    assert rows[0]["mean_hu"] == pytest.approx(liver.mean_hu)
    assert rows[1]["volume_mm3"] == 0 and spleen.voxel_count == 0
    assert rows[3]["threshold"] == 0.3
    assert {r["job_id"] for r in rows} == {job_id}
    assert all(r["seg_sop_instance_uid"] and r["sr_sop_instance_uid"] for r in rows)

    text = runner.invoke(app, ["findings", study_uid], env=env)
    assert text.exit_code == 0
    assert "liver" in text.stdout and "probability=0.700" in text.stdout

    unknown = runner.invoke(app, ["findings", "1.2.3.4"], env=env)
    assert unknown.exit_code == 3


def test_findings_of_superseded_jobs_are_left_out_on_postgresql(postgres_url: str) -> None:
    study_uid, _ = _record(postgres_url, status="superseded")
    engine = make_engine(postgres_url)
    try:
        with make_session_factory(engine)() as s:
            assert findings_of_study(s, study_uid) == []
    finally:
        engine.dispose()
