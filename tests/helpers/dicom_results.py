"""Real source series, a model card and validators for the DICOM result builder tests."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file

from pacs_agent.domain.results import (
    AlgorithmSpec,
    ClassificationResult,
    CodedConcept,
    JobResult,
    ResultUIDs,
    SegmentResult,
    SegmentSpec,
)
from pacs_agent.domain.uids import DEFAULT_UID_ROOT, device_uid, job_result_uids
from tests.helpers.paths import SHARED_DATA

LIVER_DIR = SHARED_DATA / "ct_liver_3sl_with_seg_dcmqi"
LIVER_CT_DIR = LIVER_DIR / "ct"
DCMQI_LIVER_SEG = LIVER_DIR / "liver.dcm"
TORSO_J2K_DIR = SHARED_DATA / "ct_torso_human_totalseg_20sl"

#: pydicom's bundled 5-slice CT series (16x16, 2.5 mm apart, stored in decreasing z).
PYDICOM_CT5N = ("2062", "2392", "2693", "3023", "3353")
#: pydicom's bundled CT series with a 200 mm gap between its first two slices.
PYDICOM_CT2_GAPPED = ("17106", "17136", "17166", "17196")

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"

ANATOMY = CodedConcept("123037004", "SCT", "Anatomical Structure")
LIVER = SegmentSpec(1, "liver", ANATOMY, CodedConcept("10200004", "SCT", "Liver"))
SPLEEN = SegmentSpec(2, "spleen", ANATOMY, CodedConcept("78961009", "SCT", "Spleen"))
SPECS = (LIVER, SPLEEN)


def liver_ct() -> list[Dataset]:
    """The 3 dcmqi CT slices (uncompressed, 1 mm apart, SliceThickness 1.25 mm)."""
    return [pydicom.dcmread(p) for p in sorted(LIVER_CT_DIR.glob("*.dcm"))]


def _pydicom_series(folder: str, names: Sequence[str]) -> list[Dataset]:
    datasets: list[Dataset] = []
    for name in names:
        path = get_testdata_file(f"dicomdirtests/{folder}/{name}", download=False)
        assert isinstance(path, str), f"pydicom test file {folder}/{name} is missing"
        datasets.append(pydicom.dcmread(path))
    return datasets


def pydicom_ct5n() -> list[Dataset]:
    return _pydicom_series("98892001/CT5N", PYDICOM_CT5N)


def pydicom_ct2_gapped() -> list[Dataset]:
    return _pydicom_series("77654033/CT2", PYDICOM_CT2_GAPPED)


def torso_j2k(count: int = 3) -> list[Dataset]:
    """The first ``count`` JPEG 2000 compressed torso CT slices (pixel data only is used)."""
    return [pydicom.dcmread(p) for p in sorted(TORSO_J2K_DIR.iterdir())[:count]]


def algorithm(
    name: str = "spleen_ct_segmentation", version: str = "0.5.1", *, clinical_use: bool = False
) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name,
        version=version,
        device_uid=device_uid(DEFAULT_UID_ROOT, name, version),
        clinical_use=clinical_use,
    )


def job_result(
    sources: Sequence[Dataset],
    segments: tuple[SegmentResult, ...],
    model: AlgorithmSpec | None = None,
    *,
    root: str = DEFAULT_UID_ROOT,
    classifications: tuple[ClassificationResult, ...] = (),
) -> JobResult:
    model = model or algorithm()
    uids = job_result_uids(
        root,
        str(sources[0].StudyInstanceUID),
        str(sources[0].SeriesInstanceUID),
        model.name,
        model.version,
    )
    return JobResult(
        algorithm=model,
        segments=segments,
        uids=ResultUIDs(*uids),
        classifications=classifications,
    )


#: Findings of a classification model card (SNOMED CT), with the card's thresholds.
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
NODULE = CodedConcept("27925004", "SCT", "Nodule")


def classifications(p_pneumothorax: float, p_nodule: float) -> tuple[ClassificationResult, ...]:
    return (
        ClassificationResult(PNEUMOTHORAX, "pneumothorax", p_pneumothorax, threshold=0.5),
        ClassificationResult(NODULE, "nodule", p_nodule, threshold=0.3),
    )


def box_mask(sources: Sequence[Dataset], label: int = 1) -> np.ndarray:
    """A label map with a different box on each slice (so frames cannot be confused)."""
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    mask = np.zeros((len(sources), rows, columns), dtype=np.uint8)
    for index in range(len(sources)):
        top = (index * rows) // (2 * len(sources))
        mask[index, top : top + rows // 4 + 1, columns // 4 : columns // 4 + index + 2] = label
    return mask


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dciodvfy on ``path``."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return (
        [line for line in lines if "Error" in line],
        [line for line in lines if "Warning" in line],
    )


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, check=False)
