"""The synthetic demo CT: valid DICOM, deterministic, with a truthful mask, and torch-free."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacs_agent.demo.synthetic import (
    RESCALE_INTERCEPT,
    make_ct_study,
    make_ct_study_with_truth,
    make_phantom,
)


def _small(
    out_dir: Path | None = None, *, seed: int = 0
) -> tuple[list[Dataset], npt.NDArray[np.uint8]]:
    return make_ct_study_with_truth(out_dir, rows=96, cols=112, slices=12, seed=seed)


def _dciodvfy() -> str:
    path = shutil.which("dciodvfy")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) is required in CI but is not installed")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return path


def test_synthetic_ct_study_passes_dciodvfy_without_errors(tmp_path: Path) -> None:
    dciodvfy = _dciodvfy()
    make_ct_study(tmp_path, slices=8)
    files = sorted(tmp_path.glob("CT*.dcm"))
    assert [f.name for f in files] == [f"CT{n:04d}.dcm" for n in range(1, 9)]
    for path in files:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if "Error" in line]
        assert errors == [], f"{path.name}:\n{report}"
        assert "CTImage" in report


def test_synthetic_ct_study_round_trips_through_pydicom(tmp_path: Path) -> None:
    datasets, mask = _small(tmp_path)
    assert mask.shape == (12, 96, 112)
    assert mask.dtype == np.uint8
    files = sorted(tmp_path.glob("CT*.dcm"))
    assert len(files) == len(datasets) == 12
    for k, (path, original) in enumerate(zip(files, datasets, strict=True)):
        read = pydicom.dcmread(path)
        assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert read.SOPClassUID == CTImageStorage
        assert read.file_meta.MediaStorageSOPInstanceUID == read.SOPInstanceUID
        assert read.SOPInstanceUID == original.SOPInstanceUID
        assert read.InstanceNumber == k + 1
        assert (read.Rows, read.Columns) == (96, 112)
        np.testing.assert_array_equal(read.pixel_array, original.pixel_array)
        hu = read.pixel_array.astype(np.int32) * int(read.RescaleSlope) + int(read.RescaleIntercept)
        assert int(read.RescaleIntercept) == RESCALE_INTERCEPT
        assert hu.min() >= -1024
    assert len({ds.SOPInstanceUID for ds in datasets}) == 12
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    # Slices are contiguous along the normal of their (axial) orientation.
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    np.testing.assert_allclose(np.diff(z), -2.0)


def test_same_seed_gives_the_same_study_and_another_seed_a_new_one() -> None:
    first, first_mask = _small(seed=3)
    again, again_mask = _small(seed=3)
    other, _ = _small(seed=4)
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert first[0].PixelData == again[0].PixelData
    np.testing.assert_array_equal(first_mask, again_mask)
    assert first[0].StudyInstanceUID != other[0].StudyInstanceUID
    assert first[0].SOPInstanceUID != other[0].SOPInstanceUID


def test_caller_given_study_uid_is_used() -> None:
    datasets = make_ct_study(None, rows=64, cols=64, slices=8, study_uid="1.2.3.4.5")
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4.5"}


def test_phantom_mask_marks_blobs_brighter_than_the_tissue_around_them() -> None:
    volume, mask = make_phantom((32, 160, 160), np.random.default_rng(11), n_blobs=3)
    assert volume.dtype == np.int16
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    inside = volume[mask == 1].astype(np.float64)
    soft_tissue = volume[(mask == 0) & (volume > -50) & (volume < 120)].astype(np.float64)
    assert inside.mean() - soft_tissue.mean() > 100.0
    assert volume[0, 0, 0] < -900  # air in the corner
    empty_volume, empty_mask = make_phantom((16, 64, 64), 0, n_blobs=0)
    assert empty_mask.sum() == 0
    assert empty_volume.shape == (16, 64, 64)


def test_phantom_refuses_a_shape_too_small_for_a_body() -> None:
    with pytest.raises(ValueError, match="too small"):
        make_phantom((4, 32, 32), 0, 1)


def test_demo_data_module_never_imports_torch_or_monai() -> None:
    code = (
        "import sys, pacs_agent.demo.synthetic as s; s.make_ct_study(None, rows=64, cols=64, "
        "slices=8); bad = [m for m in ('torch', 'monai') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
