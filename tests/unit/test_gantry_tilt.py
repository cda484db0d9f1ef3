"""Gantry tilt correction: resampling onto an orthogonal grid and labels back onto tilted frames.

The tilted series is derived from the real 20-slice CT (tests/helpers/tilted.py says how): the
geometry is that of an 18.5 degree tilted acquisition, with a sphere of known position and size
burned in. Every check is made in patient coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs_agent.catalog import _Accepts
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.dicom.volume import SeriesVolumeError, plan_volume, read_volume
from tests.helpers.dicom_results import LIVER
from tests.helpers.realct import REAL_CT_DIR
from tests.helpers.tilted import (
    SPHERE_HU,
    TILT_DEG,
    Sphere,
    pixel_centres,
    sphere_inside_series,
    tilted_series,
)


@pytest.fixture(scope="module")
def sphere_and_series() -> tuple[Sphere, list[Dataset]]:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"{REAL_CT_DIR} is missing")
    real = [pydicom.dcmread(p) for p in sorted(REAL_CT_DIR.iterdir()) if p.is_file()]
    sphere = sphere_inside_series(real)
    return sphere, tilted_series(real, sphere)


def _grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return np.asarray(index @ affine[:3, :3].T + affine[:3, 3])


def test_a_tilted_series_is_still_refused_when_the_model_says_reject(
    sphere_and_series: tuple[Sphere, list[Dataset]],
) -> None:
    _, series = sphere_and_series
    with pytest.raises(SeriesVolumeError, match=r"gantry tilt: the slices step 18\.5 degrees"):
        plan_volume(series, gantry_tilt="reject")


def test_resampled_grid_has_an_orthogonal_affine_and_the_sphere_lands_where_it_is(
    sphere_and_series: tuple[Sphere, list[Dataset]],
) -> None:
    sphere, series = sphere_and_series
    plan = plan_volume(series, gantry_tilt="resample")
    assert plan.tilted and plan.resampled
    assert plan.tilt_deg == pytest.approx(TILT_DEG, abs=0.05)
    axes = plan.affine[:3, :3] / np.asarray(plan.spacing)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)  # orthogonal
    # Along the normal the grid steps by the slice distance (2 mm table steps * cos(tilt)).
    assert plan.spacing[2] == pytest.approx(2.0 * math.cos(math.radians(TILT_DEG)), abs=1e-3)
    # The grid is wider than a frame: no acquired pixel is cut off.
    assert plan.shape[0] == 512 and plan.shape[1] > 512 and plan.shape[2] == 20

    volume = read_volume(series, plan)
    assert volume.shape == plan.shape
    points = _grid_points(plan.affine, plan.shape)
    bright = volume > (SPHERE_HU + 100.0) / 2
    voxel_mm3 = float(np.prod(plan.spacing))
    sphere_mm3 = 4.0 / 3.0 * math.pi * sphere.radius_mm**3
    assert bright.sum() * voxel_mm3 == pytest.approx(sphere_mm3, rel=0.08)
    np.testing.assert_allclose(points[bright].mean(axis=0), sphere.center, atol=0.3)
    distance = np.linalg.norm(points[bright] - np.asarray(sphere.center), axis=-1)
    # Nothing bright away from the sphere but the real CT's own densest bone (2 voxels).
    assert int((distance > sphere.radius_mm + 1.0).sum()) <= 2
    # Every voxel well inside the sphere is bright, wherever its tilted slice put it.
    deep = np.linalg.norm(points - np.asarray(sphere.center), axis=-1) < sphere.radius_mm - 1.0
    assert bool(bright[deep].all())


def test_labels_on_the_grid_map_back_onto_each_tilted_frame(
    sphere_and_series: tuple[Sphere, list[Dataset]],
) -> None:
    from workers.runtime.bundle import labels_on_frames

    sphere, series = sphere_and_series
    plan = plan_volume(series, gantry_tilt="resample")
    labels = (read_volume(series, plan) > (SPHERE_HU + 100.0) / 2).astype(np.int64)
    mask = labels_on_frames(labels, plan.affine, series)
    truth = np.stack([sphere.contains(pixel_centres(ds)) for ds in series])
    assert mask.shape == (20, 512, 512)
    overlap = np.logical_and(mask == 1, truth).sum()
    dice = 2.0 * overlap / ((mask == 1).sum() + truth.sum())
    assert dice > 0.97
    # The volume measured on the tilted frames (spacing along their normal) is the sphere's.
    (result,) = segment_results(mask, series, (LIVER,))
    sphere_mm3 = 4.0 / 3.0 * math.pi * sphere.radius_mm**3
    assert result.volume_mm3 == pytest.approx(sphere_mm3, rel=0.08)
    assert result.mean_hu is not None and result.mean_hu > 2800


def test_the_sheared_choice_keeps_the_acquired_grid(
    sphere_and_series: tuple[Sphere, list[Dataset]],
) -> None:
    _, series = sphere_and_series
    plan = plan_volume(series, gantry_tilt="sheared")
    assert plan.tilted and not plan.resampled and plan.shape == (512, 512, 20)
    last = series[plan.frames[-1].dataset_index]
    np.testing.assert_allclose(
        (plan.affine @ np.array([0, 0, 19, 1.0]))[:3],
        np.asarray(last.ImagePositionPatient, float),
        atol=1e-3,
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing", "missing slices: 1 slice"),
        ("orientation", "mixed orientations"),
    ],
)
def test_what_resampling_cannot_correct_is_still_refused(
    sphere_and_series: tuple[Sphere, list[Dataset]], damage: str, reason: str
) -> None:
    _, series = sphere_and_series
    ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    if damage == "missing":
        damaged = ordered[:9] + ordered[10:]
    else:
        odd = Dataset()
        odd.update(ordered[5])
        odd.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        damaged = [*ordered[:5], odd, *ordered[6:]]
    with pytest.raises(SeriesVolumeError, match=reason):
        plan_volume(damaged, gantry_tilt="resample")


def test_model_cards_resample_by_default_and_old_booleans_keep_their_meaning() -> None:
    assert _Accepts().gantry_tilt == "resample"
    assert _Accepts(gantry_tilt=True).gantry_tilt == "sheared"
    assert _Accepts(gantry_tilt=False).gantry_tilt == "reject"
    with pytest.raises(ValueError, match="gantry_tilt"):
        _Accepts(gantry_tilt="rotate")
