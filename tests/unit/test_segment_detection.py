"""When a segment is a finding: the card's volume thresholds and connected components.

The decision itself is pure (component sizes in voxels and a voxel volume in, kept components
and "detected" out); ``measure_segments`` finds the components in 3D on real series (the dcmqi
liver CT, 1 mm apart; pydicom's CT5N series, 2.5 mm apart and stored in decreasing z), so
connectivity across slices and volumes from the slice geometry are pinned too.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydicom import Dataset

from pacs_agent.dicom.geometry import measure_segments, slice_order, voxel_volume_mm3
from pacs_agent.domain.detection import DetectionCriteria, is_detected, select_components
from pacs_agent.domain.results import SegmentResult, SegmentSpec
from tests.helpers.dicom_results import LIVER, SPLEEN, liver_ct, pydicom_ct5n


def _with(spec: SegmentSpec, **criteria: float) -> SegmentSpec:
    return replace(spec, detection=DetectionCriteria(**criteria))  # type: ignore[arg-type]


# --- the pure decision --------------------------------------------------------------------


def test_a_few_stray_voxels_are_dropped_and_do_not_flag() -> None:
    criteria = DetectionCriteria(min_volume_mm3=50.0, min_component_mm3=5.0)
    selection = select_components([1, 2, 1], 1.28, criteria)
    assert selection.kept == () and selection.component_count == 0
    assert (selection.kept_voxels, selection.dropped_voxels, selection.largest_voxels) == (0, 4, 0)
    assert not is_detected(selection.kept_voxels, selection.kept_voxels * 1.28, criteria)


def test_a_real_blob_is_kept_and_flags_while_its_specks_are_dropped() -> None:
    criteria = DetectionCriteria(min_volume_mm3=50.0, min_component_mm3=5.0)
    selection = select_components([3, 200, 1, 40], 1.28, criteria)
    assert selection.kept == (1, 3)  # largest first
    assert (selection.kept_voxels, selection.dropped_voxels) == (240, 4)
    assert selection.largest_voxels == 200 and selection.component_count == 2
    assert is_detected(240, 240 * 1.28, criteria)


def test_the_volume_threshold_is_on_the_sum_of_the_kept_components() -> None:
    criteria = DetectionCriteria(min_volume_mm3=50.0, min_component_mm3=20.0)
    selection = select_components([20, 20], 1.25, criteria)  # two of 25 mm3 each
    assert selection.component_count == 2
    assert is_detected(selection.kept_voxels, selection.kept_voxels * 1.25, criteria)
    assert not is_detected(20, 25.0, criteria)


def test_a_threshold_of_exactly_n_voxels_is_reached_despite_rounding() -> None:
    voxel = 0.1 * 3  # 0.30000000000000004
    criteria = DetectionCriteria(min_volume_mm3=0.9, min_component_mm3=0.9)
    assert select_components([3], voxel, criteria).kept == (0,)
    assert is_detected(3, 3 * 0.1 * 3, criteria)


def test_default_criteria_keep_every_voxel_and_detect_any_as_before() -> None:
    criteria = DetectionCriteria()
    selection = select_components([1, 1], 0.5, criteria)
    assert selection.component_count == 2 and selection.dropped_voxels == 0
    assert is_detected(1, 0.5, criteria)
    assert not is_detected(0, 0.0, criteria)


@pytest.mark.parametrize(
    "criteria",
    [{"min_volume_mm3": -1.0}, {"min_component_mm3": -0.1}, {"connectivity": 8}],
)
def test_criteria_refuse_negative_volumes_and_unknown_connectivity(
    criteria: dict[str, float],
) -> None:
    with pytest.raises(ValueError):
        DetectionCriteria(**criteria)  # type: ignore[arg-type]


def test_a_segment_result_is_detected_at_its_cards_volume_threshold() -> None:
    spec = _with(LIVER, min_volume_mm3=100.0)
    assert not SegmentResult(spec, voxel_count=99, volume_mm3=99.0).detected
    assert SegmentResult(spec, voxel_count=100, volume_mm3=100.0).detected
    assert SegmentResult(LIVER, voxel_count=1, volume_mm3=0.6).detected


# --- components on real series ------------------------------------------------------------


def _blob_and_specks(ct: list[Dataset]) -> np.ndarray:
    """A 3-slice 20 x 20 blob of label 1 and three isolated single voxels of label 1."""
    mask = np.zeros((len(ct), int(ct[0].Rows), int(ct[0].Columns)), dtype=np.uint8)
    mask[:, 200:220, 200:220] = 1
    mask[0, 10, 10] = mask[1, 400, 30] = mask[2, 50, 480] = 1
    return mask


def test_stray_voxels_alone_do_not_flag_and_leave_nothing_for_the_seg() -> None:
    ct = liver_ct()
    mask = np.zeros((3, 512, 512), dtype=np.uint8)
    mask[0, 10, 10] = mask[1, 400, 30] = mask[2, 50, 480] = 1
    measured = measure_segments(mask, ct, [_with(LIVER, min_component_mm3=2.0)])
    (liver,) = measured.segments
    assert not liver.detected
    assert (liver.voxel_count, liver.component_count, liver.largest_component_mm3) == (0, 0, 0.0)
    assert not measured.mask.any()
    # Without thresholds (a card that has none) the same voxels flag, as they always did.
    (before,) = measure_segments(mask, ct, [LIVER]).segments
    assert before.detected and before.component_count == 3


def test_a_blob_flags_with_its_specks_dropped_from_volume_hu_and_seg() -> None:
    ct = liver_ct()
    mask = _blob_and_specks(ct)
    voxel = voxel_volume_mm3(ct)
    spec = _with(LIVER, min_volume_mm3=100.0, min_component_mm3=2.0)
    measured = measure_segments(mask, ct, [spec, SPLEEN])
    liver, spleen = measured.segments
    assert liver.detected and not spleen.detected
    assert liver.voxel_count == 3 * 20 * 20
    assert liver.volume_mm3 == pytest.approx(1200 * voxel)
    assert liver.component_count == 1
    assert liver.largest_component_mm3 == pytest.approx(1200 * voxel)
    blob = np.zeros_like(mask)
    blob[:, 200:220, 200:220] = 1
    np.testing.assert_array_equal(measured.mask, blob)
    (blob_only,) = measure_segments(blob, ct, [LIVER]).segments
    assert liver.mean_hu == pytest.approx(blob_only.mean_hu)
    assert (spleen.component_count, spleen.largest_component_mm3) == (0, 0.0)


def test_a_blob_under_the_volume_threshold_is_measured_but_not_detected_nor_in_the_seg() -> None:
    ct = liver_ct()
    mask = _blob_and_specks(ct)
    spec = _with(LIVER, min_volume_mm3=10_000.0, min_component_mm3=2.0)
    measured = measure_segments(mask, ct, [spec])
    (liver,) = measured.segments
    assert not liver.detected
    assert liver.voxel_count == 1200 and liver.component_count == 1
    assert not measured.mask.any()


def test_component_volumes_follow_the_voxel_spacing() -> None:
    """The same 8-voxel cube is 4.8 mm3 on CT5N (0.49 x 0.49 x 2.5 mm) and 5.3 mm3 on the
    liver CT (0.81 x 0.81 x 1 mm): a 5 mm3 minimum drops one and keeps the other."""
    spec = _with(LIVER, min_component_mm3=5.0)
    for ct, kept in ((pydicom_ct5n(), False), (liver_ct(), True)):
        mask = np.zeros((len(ct), int(ct[0].Rows), int(ct[0].Columns)), dtype=np.uint8)
        order = slice_order(ct)
        for index in order[:2]:  # two slices that are neighbours along the normal
            mask[index, 4:6, 4:6] = 1
        (liver,) = measure_segments(mask, ct, [spec]).segments
        assert liver.detected is kept
        expected = 8 * voxel_volume_mm3(ct)
        assert liver.largest_component_mm3 == pytest.approx(expected if kept else 0.0)
    assert 8 * voxel_volume_mm3(pydicom_ct5n()) < 5.0 < 8 * voxel_volume_mm3(liver_ct())


def test_components_join_across_slices_in_position_order_not_in_the_order_given() -> None:
    ct = pydicom_ct5n()  # stored in decreasing z: list order is not slice order
    shuffled = [ct[i] for i in (3, 0, 4, 1, 2)]
    order = slice_order(shuffled)
    mask = np.zeros((5, 16, 16), dtype=np.uint8)
    # A column of voxels through all five slices, one pixel to the side on every other slice:
    # one component with 26 (corner) neighbours, five with 6 (face) neighbours.
    for step, index in enumerate(order):
        mask[index, 8, 8 + step % 2] = 1
    (diagonal,) = measure_segments(mask, shuffled, [LIVER]).segments
    assert diagonal.component_count == 1
    (faces,) = measure_segments(mask, shuffled, [_with(LIVER, connectivity=6)]).segments
    assert faces.component_count == 5
    (edges,) = measure_segments(mask, shuffled, [_with(LIVER, connectivity=18)]).segments
    assert edges.component_count == 1


def test_each_segment_is_measured_with_its_own_criteria() -> None:
    ct = liver_ct()
    mask = _blob_and_specks(ct)
    mask[1, 300:304, 300:304] = 2  # a 16-voxel spleen patch (about 10.5 mm3)
    specs = [_with(LIVER, min_component_mm3=2.0), _with(SPLEEN, min_volume_mm3=50.0)]
    measured = measure_segments(mask, ct, specs)
    liver, spleen = measured.segments
    assert liver.detected and liver.component_count == 1
    assert not spleen.detected and spleen.voxel_count == 16 and spleen.component_count == 1
    assert set(np.unique(measured.mask)) == {0, 1}
