"""The failure notice SR (pacs_agent.dicom.notice) on real CT headers: valid, readable, and
deterministic in its UIDs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from pacs_agent.dicom.io import write_dataset
from pacs_agent.dicom.notice import build_failure_notice
from pacs_agent.domain.uids import DEFAULT_UID_ROOT, failure_notice_uids, job_result_uids
from tests.helpers.dicom_results import algorithm, dciodvfy_errors, dsrdump, liver_ct

REASON = (
    "ModelInputError: series cannot be made into one volume: missing slices: 1 slice(s) "
    "absent at a 1.00 mm step"
)


def _uids(sources: Sequence[Dataset]) -> tuple[str, str]:
    model = algorithm()
    return failure_notice_uids(
        DEFAULT_UID_ROOT,
        str(sources[0].StudyInstanceUID),
        str(sources[0].SeriesInstanceUID),
        model.name,
        model.version,
    )


def test_failure_notice_says_which_model_could_not_process_which_series_and_why(
    tmp_path: Path,
) -> None:
    sources = liver_ct()
    series_uid, sop_uid = _uids(sources)
    notice = build_failure_notice(
        sources, algorithm(), REASON, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    path = write_dataset(notice, tmp_path / "notice.dcm")
    errors, _ = dciodvfy_errors(path)
    assert errors == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Diagnostic Imaging Report" in dump.stdout
    read = dcmread(path)
    assert read.StudyInstanceUID == sources[0].StudyInstanceUID
    assert read.PatientID == sources[0].PatientID
    assert read.SeriesDescription.startswith("AI NOT PROCESSED: spleen_ct_segmentation")
    assert read.CompletionFlag == "COMPLETE" and read.VerificationFlag == "UNVERIFIED"
    (comment,) = [
        item
        for item in read.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    text = str(comment.TextValue)
    assert text.startswith("AI processing not performed: the model spleen_ct_segmentation 0.5.1")
    assert REASON in text and str(sources[0].SeriesInstanceUID) in text
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in read.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}


def test_failure_notice_uids_repeat_per_job_and_differ_from_the_result_uids() -> None:
    sources = liver_ct()
    assert _uids(sources) == _uids(sources)
    model = algorithm()
    results = job_result_uids(
        DEFAULT_UID_ROOT,
        str(sources[0].StudyInstanceUID),
        str(sources[0].SeriesInstanceUID),
        model.name,
        model.version,
    )
    assert not set(_uids(sources)) & set(results)


def test_a_long_or_non_ascii_reason_is_cut_and_encoded_in_utf8(tmp_path: Path) -> None:
    sources = liver_ct()
    series_uid, sop_uid = _uids(sources)
    reason = "Fehler: Schichtlücke " + "x" * 5000
    notice = build_failure_notice(
        sources, algorithm(), reason, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    path = write_dataset(notice, tmp_path / "notice.dcm")
    read = dcmread(path)
    assert read.SpecificCharacterSet == "ISO_IR 192"
    (comment,) = [
        item
        for item in read.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert "Schichtlücke" in str(comment.TextValue)
    assert len(str(comment.TextValue)) < 1400
    assert dciodvfy_errors(path)[0] == []


def test_failure_notice_of_sources_without_patient_id_study_id_and_study_date_is_valid(
    tmp_path: Path,
) -> None:
    """Type 2 attributes the sources leave out are written empty, as in the measurement report."""
    sources = liver_ct()
    for ds in sources:
        for keyword in ("PatientID", "StudyID", "StudyDate"):
            del ds[keyword]
    series_uid, sop_uid = _uids(sources)
    notice = build_failure_notice(
        sources, algorithm(), REASON, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    path = write_dataset(notice, tmp_path / "notice.dcm")
    assert dciodvfy_errors(path)[0] == []
    read = dcmread(path)
    assert read.PatientID == "" and read.StudyID == "" and read.StudyDate == ""
    assert all("PatientID" not in ds for ds in sources)
