"""Make the real 20-slice CT in ``../shared/data`` usable as a study in tests.

Its anonymiser blanked attributes that must not be empty (see ``../shared/data/MANIFEST.md``):
SOP Class/Instance UID, Study/Series Instance UID, Patient ID. :func:`repair_real_ct` writes
repaired copies; the originals are never modified.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.helpers.paths import SHARED_DATA

#: The real CT series (20 slices, 512x512, 2 mm, JPEG 2000 lossless), relative to the project.
REAL_CT_DIR = SHARED_DATA / "ct_torso_human_totalseg_20sl"
REPAIRED_PATIENT_ID = "REALCT-0001"


def repair_real_ct(src_dir: Path, dst_dir: Path) -> list[Path]:
    """Copy every DICOM file of ``src_dir`` into ``dst_dir`` with the blanked identifiers restored.

    SOP Class and SOP Instance UID come from each file's meta header; all files share one Study
    Instance UID and one Series Instance UID, generated from the folder's name (so repeated repairs
    of the same folder give the same UIDs); Patient ID is ``REALCT-0001`` where it is empty. Pixel
    data and transfer syntax are kept as they are. Returns the written paths, sorted by name.
    Raises FileNotFoundError when ``src_dir`` holds no files.
    """
    sources = sorted(p for p in Path(src_dir).iterdir() if p.is_file() and p.name != "DICOMDIR")
    if not sources:
        raise FileNotFoundError(f"no files in {src_dir}")
    entropy = ["pacs-agent test repair", Path(src_dir).name]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    dst_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for source in sources:
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if not ds.get("PatientID"):
            ds.PatientID = REPAIRED_PATIENT_ID
        target = dst_dir / f"{source.name}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return sorted(written)


def enhanced_real_ct(dst_dir: Path) -> Path:
    """The real CT as one multi-frame image: its repaired slices converted by highdicom's
    legacy converter into a Legacy Converted Enhanced CT Image (20 frames, the slices' JPEG 2000
    frames kept as they are, same patient; a Study and a Series Instance UID of its own, so that
    it is a study apart from the repaired slices wherever both are sent).

    Written to ``dst_dir/enhanced_ct.dcm``; the path is returned. Raises FileNotFoundError when
    the real CT is missing.
    """
    import highdicom as hd

    slices = [pydicom.dcmread(p) for p in repair_real_ct(REAL_CT_DIR, dst_dir / "slices")]
    entropy = ["pacs-agent test enhanced CT", REAL_CT_DIR.name]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices,
        series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
        series_number=2,
        sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "sop"]),
        instance_number=1,
    )
    enhanced.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    target = dst_dir / "enhanced_ct.dcm"
    enhanced.save_as(target, enforce_file_format=True)
    return target
