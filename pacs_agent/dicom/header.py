"""What the index keeps of a received instance, read from its header (no pixel data)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

from pacs_agent.storage.spool import check_uid


@dataclass(frozen=True)
class InstanceHeader:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    series_description: str | None
    body_part_examined: str | None
    series_number: int | None
    instance_number: int | None
    image_type: str | None = None
    """ImageType values joined by a backslash, for routing rules."""
    slice_thickness: float | None = None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def instance_header(ds: Dataset) -> InstanceHeader:
    """The indexed attributes of ``ds``. Raises InvalidUID when a UID is empty or invalid."""
    return InstanceHeader(
        study_instance_uid=check_uid("StudyInstanceUID", ds.get("StudyInstanceUID")),
        series_instance_uid=check_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID")),
        sop_instance_uid=check_uid("SOPInstanceUID", ds.get("SOPInstanceUID")),
        sop_class_uid=check_uid("SOPClassUID", ds.get("SOPClassUID")),
        modality=_text(ds, "Modality", 16),
        patient_id=_text(ds, "PatientID", 64),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        image_type=_image_type(ds),
        slice_thickness=_float(ds, "SliceThickness"),
    )


def _image_type(ds: Dataset) -> str | None:
    value = ds.get("ImageType")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return "\\".join(str(v).strip() for v in values)[:128] or None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
