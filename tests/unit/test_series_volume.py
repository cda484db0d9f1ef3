"""Series to volume (pacs_agent.dicom.volume) on real files: ../shared/data and pydicom's own."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence

from pacs_agent.dicom.volume import SeriesVolumeError, plan_volume, read_volume
from tests.helpers.realct import REAL_CT_DIR


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)  # by name only: a pattern would go to the network
    assert path is not None, name
    return Path(str(path))


DICOMDIR_TESTS = _testdata("CT_small.dcm").parent / "dicomdirtests"


def _series(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


@pytest.fixture(scope="module")
def real_ct() -> list[Dataset]:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"{REAL_CT_DIR} is missing")
    return [pydicom.dcmread(p) for p in sorted(REAL_CT_DIR.iterdir()) if p.is_file()]


def test_compressed_ct_series_in_any_order_becomes_a_volume_with_the_series_geometry(
    real_ct: list[Dataset],
) -> None:
    shuffled = real_ct[7:] + real_ct[:7]
    plan = plan_volume(shuffled)
    assert plan.shape == (512, 512, 20)
    assert plan.spacing[2] == pytest.approx(2.0, abs=1e-3)
    z_positions = [float(f.position[2]) for f in plan.frames]  # type: ignore[index]
    assert z_positions == sorted(z_positions)
    volume = read_volume(shuffled, plan)
    for z in (0, 9, 19):
        ds = shuffled[plan.frames[z].dataset_index]
        # Voxel (x, y, z) sits at the pixel (row y, column x) of the z-th slice, in HU.
        np.testing.assert_allclose(volume[:, :, z].T, apply_modality_lut(ds.pixel_array, ds))
        corner = plan.affine @ np.array([3.0, 5.0, z, 1.0])
        row, col = (
            np.asarray(ds.ImageOrientationPatient[:3]),
            np.asarray(ds.ImageOrientationPatient[3:]),
        )
        spacing = [float(v) for v in ds.PixelSpacing]
        expected = (
            np.asarray(ds.ImagePositionPatient, float) + 3 * spacing[1] * row + 5 * spacing[0] * col
        )
        np.testing.assert_allclose(corner[:3], expected, atol=1e-3)


def test_monochrome1_radiograph_is_inverted_so_higher_is_brighter() -> None:
    ds = pydicom.dcmread(DICOMDIR_TESTS / "77654033" / "CR1" / "6154")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    plan = plan_volume([ds])
    assert plan.is_2d and plan.shape == (ds.Columns, ds.Rows, 1)
    volume = read_volume([ds], plan)[:, :, 0].T
    stored = ds.pixel_array.astype(np.float64)
    expected = (2**ds.BitsStored - 1 - stored) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume, expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_decode_to_the_uncompressed_values(name: str) -> None:
    reference = pydicom.dcmread(_testdata("MR_small.dcm"))
    compressed = pydicom.dcmread(_testdata(name))
    a = read_volume([reference], plan_volume([reference]))
    b = read_volume([compressed], plan_volume([compressed]))
    np.testing.assert_array_equal(a, b)


def test_multi_frame_rt_dose_is_stacked_by_its_frame_offsets() -> None:
    ds = pydicom.dcmread(_testdata("rtdose.dcm"))
    plan = plan_volume([ds])
    assert plan.shape == (ds.Columns, ds.Rows, int(ds.NumberOfFrames))
    assert plan.spacing[2] == pytest.approx(5.0)
    volume = read_volume([ds], plan)
    np.testing.assert_allclose(volume[:, :, 3].T, ds.pixel_array[3].astype(np.float32))


def _enhanced(frames_z: list[float]) -> Dataset:
    """An enhanced multi-frame image whose frames come in the given z order."""
    ds = copy.deepcopy(pydicom.dcmread(_testdata("CT_small.dcm")))
    pixels = ds.pixel_array
    count = len(frames_z)
    ds.NumberOfFrames = count
    ds.PixelData = np.stack([pixels + i for i in range(count)]).astype(pixels.dtype).tobytes()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[keyword]
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 1.0
    transform = Dataset()
    transform.RescaleSlope = 2
    transform.RescaleIntercept = -10
    transform.RescaleType = "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for z in frames_z:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = Sequence([position])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    return ds


def test_enhanced_multi_frame_uses_per_frame_positions_and_shared_rescale() -> None:
    ds = _enhanced([4.0, 0.0, 2.0])
    plan = plan_volume([ds])
    assert [f.frame_index for f in plan.frames] == [1, 2, 0]
    assert plan.spacing == (0.5, 0.5, 2.0)
    volume = read_volume([ds], plan)
    raw = pydicom.dcmread(_testdata("CT_small.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(volume[:, :, 0].T, (raw + 1) * 2 - 10)  # frame 1 is at z = 0


def test_mixed_orientations_fail_with_a_reason() -> None:
    with pytest.raises(SeriesVolumeError, match="mixed orientations"):
        plan_volume(_series(DICOMDIR_TESTS / "98892003" / "MR2"))


def test_duplicate_positions_fail_with_a_reason() -> None:
    with pytest.raises(SeriesVolumeError, match="duplicate positions"):
        plan_volume(_series(DICOMDIR_TESTS / "98892003" / "MR1"))


def test_localizer_mixed_in_fails_with_a_reason(real_ct: list[Dataset]) -> None:
    series = [copy.deepcopy(ds) for ds in real_ct]
    scout = series[0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(SeriesVolumeError, match="localizer"):
        plan_volume(series)


def test_missing_slice_fails_and_says_how_many(real_ct: list[Dataset]) -> None:
    with pytest.raises(SeriesVolumeError, match=r"missing slices: 2 slice\(s\) absent"):
        plan_volume(real_ct[:8] + real_ct[10:])


def test_gantry_tilt_fails_unless_allowed_then_the_affine_follows_the_slices(
    real_ct: list[Dataset],
) -> None:
    series = [copy.deepcopy(ds) for ds in real_ct]
    order = plan_volume(series).frames
    for z, frame in enumerate(order):
        ds = series[frame.dataset_index]
        x, y, zz = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.35 * z, zz]  # about 10 degrees at 2 mm steps
    with pytest.raises(SeriesVolumeError, match="gantry tilt"):
        plan_volume(series)
    plan = plan_volume(series, gantry_tilt="sheared")
    assert plan.tilted
    last = series[plan.frames[-1].dataset_index]
    np.testing.assert_allclose(
        (plan.affine @ np.array([0, 0, 19, 1.0]))[:3],
        np.asarray(last.ImagePositionPatient, float),
        atol=1e-3,
    )


def test_too_few_slices_for_the_model_fails(real_ct: list[Dataset]) -> None:
    with pytest.raises(SeriesVolumeError, match="too few slices: 20"):
        plan_volume(real_ct, min_slices=32)


def test_uneven_spacing_fails(real_ct: list[Dataset]) -> None:
    series = [copy.deepcopy(ds) for ds in real_ct]
    ds = series[plan_volume(series).frames[5].dataset_index]
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.7]
    with pytest.raises(SeriesVolumeError, match="inconsistent slice spacing"):
        plan_volume(series)


def test_three_slice_liver_ct_from_dcmqi_is_one_volume() -> None:
    folder = REAL_CT_DIR.parent / "ct_liver_3sl_with_seg_dcmqi" / "ct"
    plan = plan_volume(_series(folder))
    assert plan.shape == (512, 512, 3)
    assert plan.spacing[2] == pytest.approx(1.0, abs=1e-3)


def test_colour_image_is_refused_with_a_reason() -> None:
    ds = pydicom.dcmread(_testdata("SC_rgb_small_odd.dcm"))
    with pytest.raises(SeriesVolumeError, match="colour images"):
        plan_volume([ds])
