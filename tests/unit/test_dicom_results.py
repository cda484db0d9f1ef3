"""The DICOM result builders: geometry, SEG, TID 1500 SR and durable writing.

Sources are real series (the dcmqi liver CT, pydicom's bundled dicomdirtests CT series and a
JPEG 2000 torso CT); masks are synthetic or the liver mask of a third-party (dcmqi) SEG. Every
object is validated with dciodvfy (dicom3tools), the SR with dsrdump (dcmtk), and each
round-trips through bytes and highdicom's readers.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_agent.dicom.geometry import (
    measure_segments,
    plane_headers,
    segment_results,
    slice_spacing_mm,
    sort_slices,
    voxel_volume_mm3,
)
from pacs_agent.dicom.io import read_header, write_dataset
from pacs_agent.dicom.seg import (
    build_segmentation,
    classification_tracking_uid,
    segment_tracking_uid,
)
from pacs_agent.dicom.sources import TYPE2_COPIED
from pacs_agent.dicom.sr import (
    COMPONENT_COUNT,
    LARGEST_COMPONENT_VOLUME,
    build_measurement_report,
    procedure_reported,
)
from pacs_agent.domain.detection import DetectionCriteria
from pacs_agent.domain.results import JobResult, SegmentSpec
from tests.helpers.dicom_results import (
    DCMQI_LIVER_SEG,
    LIVER,
    NODULE,
    PNEUMOTHORAX,
    SPECS,
    SPLEEN,
    algorithm,
    box_mask,
    classifications,
    dciodvfy_errors,
    dsrdump,
    job_result,
    liver_ct,
    pydicom_ct2_gapped,
    pydicom_ct5n,
    torso_j2k,
)
from tests.helpers.realct import REAL_CT_DIR, enhanced_real_ct, repair_real_ct

SOURCES: dict[str, Callable[[], list[Dataset]]] = {
    "dcmqi-liver-ct": liver_ct,
    "pydicom-ct5n": pydicom_ct5n,
}


@pytest.fixture(autouse=True)
def strict_writing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pydicom raises on any invalid value while the builders set elements (as highdicom's
    own tests do)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    yield


@pytest.fixture(params=sorted(SOURCES))
def sources(request: pytest.FixtureRequest) -> list[Dataset]:
    return SOURCES[request.param]()


def _liver_result(sources: Sequence[Dataset], mask: np.ndarray) -> JobResult:
    return job_result(sources, segment_results(mask, sources, SPECS))


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


#: dciodvfy warnings that may remain: inherited from the sources (the dcmqi CT's one-component
#: patient name), or from dicom3tools' 2022 tables, which predate Device UID (0018,1002) in the
#: Contributing Equipment Sequence of the SOP Common module (the IHE AIR model identity), or
#: the project's private coding scheme, which is by definition none of the standard's defined
#: terms (it is identified in the SR's Coding Scheme Identification Sequence).
ALLOWED_WARNINGS = (
    "Retired Person Name form",
    "(0x0018,0x1002) UI Device UID",
    "attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
    "Unrecognized defined term <99PACSAGENT> for value 1 of attribute <Coding Scheme Designator>",
)


def _assert_valid(path: Path) -> None:
    errors, warnings = dciodvfy_errors(path)
    assert errors == []
    unexpected = [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)]
    assert unexpected == []


def _content(report: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 content of an SR read back by highdicom."""
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def _uids(datasets: Sequence[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


# --- geometry ----------------------------------------------------------------------------


def test_sort_slices_orders_along_the_slice_normal_whatever_the_input_order() -> None:
    ct = liver_ct()
    shuffled = [ct[1], ct[0], ct[2]]
    ordered = sort_slices(shuffled)
    # normal = (1,0,0) x (0,1,0) = +z: from -128.69 to -126.69
    assert [float(ds.ImagePositionPatient[2]) for ds in ordered] == pytest.approx(
        [-128.69, -127.69, -126.69]
    )
    ct5n = pydicom_ct5n()
    z = [float(ds.ImagePositionPatient[2]) for ds in sort_slices(ct5n[::-1])]
    assert z == sorted(z)


def test_sort_slices_rejects_slices_of_another_orientation() -> None:
    ct = liver_ct()
    ct[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        sort_slices(ct)


def test_voxel_volume_uses_the_spacing_between_positions_not_slice_thickness() -> None:
    ct = liver_ct()
    assert float(ct[0].SliceThickness) == pytest.approx(1.25)
    spacing = [float(v) for v in ct[0].PixelSpacing]
    assert slice_spacing_mm(ct) == pytest.approx(1.0, abs=1e-4)
    assert voxel_volume_mm3(ct) == pytest.approx(spacing[0] * spacing[1] * 1.0, rel=1e-5)
    assert voxel_volume_mm3(pydicom_ct5n()) == pytest.approx(0.488281**2 * 2.5, rel=1e-5)


def test_voxel_volume_of_a_single_slice_falls_back_to_slice_thickness() -> None:
    ct = liver_ct()[:1]
    assert voxel_volume_mm3(ct) == pytest.approx(0.810547**2 * 1.25, rel=1e-6)


def test_voxel_volume_refuses_a_series_with_a_gap() -> None:
    with pytest.raises(ValueError, match="not uniform"):
        voxel_volume_mm3(pydicom_ct2_gapped())


def test_voxel_volume_refuses_two_slices_at_one_position() -> None:
    ct = liver_ct()
    with pytest.raises(ValueError, match="share one position"):
        voxel_volume_mm3([ct[0], ct[0], ct[1]])


def test_segment_volume_is_voxel_count_times_pixel_area_times_slice_spacing(
    sources: list[Dataset],
) -> None:
    mask = box_mask(sources)
    mask[-1, -3:, -3:] = 2
    results = segment_results(mask, sources, SPECS)
    spacing = [float(v) for v in sources[0].PixelSpacing]
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in sources)
    slice_step = positions[1] - positions[0]
    for result, label in zip(results, (1, 2), strict=True):
        count = int(np.count_nonzero(mask == label))
        assert result.voxel_count == count
        assert result.volume_mm3 == pytest.approx(
            count * spacing[0] * spacing[1] * slice_step, rel=1e-6
        )
        assert result.detected


def test_mean_hu_matches_numpy_on_the_rescaled_source_pixels(sources: list[Dataset]) -> None:
    mask = box_mask(sources)
    hounsfield = np.stack(
        [
            ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in sources
        ]
    )
    liver, spleen = segment_results(mask, sources, SPECS)
    assert liver.mean_hu == pytest.approx(float(hounsfield[mask == 1].mean()), rel=1e-9)
    assert spleen.voxel_count == 0
    assert spleen.mean_hu is None
    assert not spleen.detected


def test_mean_hu_decodes_jpeg2000_compressed_sources() -> None:
    sources = torso_j2k(3)
    assert sources[0].file_meta.TransferSyntaxUID.is_compressed
    mask = box_mask(sources)
    hounsfield = np.stack(
        [
            ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in sources
        ]
    )
    (liver,) = segment_results(mask, sources, [LIVER])
    assert liver.mean_hu == pytest.approx(float(hounsfield[mask == 1].mean()), rel=1e-9)


def test_mean_hu_is_only_reported_for_ct() -> None:
    mr_path = pydicom.data.get_testdata_file("MR_small.dcm", download=False)
    assert isinstance(mr_path, str)
    mr = [pydicom.dcmread(mr_path)]
    mask = np.zeros((1, mr[0].Rows, mr[0].Columns), dtype=np.uint8)
    mask[0, 10:20, 10:20] = 1
    (liver,) = segment_results(mask, mr, [LIVER])
    assert liver.voxel_count == 100
    assert liver.mean_hu is None


def test_segment_results_refuse_a_mask_that_does_not_fit_the_sources() -> None:
    ct = liver_ct()
    with pytest.raises(ValueError, match="frames"):
        segment_results(np.zeros((2, 512, 512), np.uint8), ct, SPECS)
    with pytest.raises(ValueError, match="512x512"):
        segment_results(np.zeros((3, 256, 256), np.uint8), ct, SPECS)
    mask = np.zeros((3, 512, 512), np.uint8)
    mask[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        segment_results(mask, ct, SPECS)


# --- SEG ---------------------------------------------------------------------------------


def test_seg_passes_dciodvfy_and_round_trips_through_highdicom(
    sources: list[Dataset], tmp_path: Path
) -> None:
    mask = box_mask(sources)
    result = _liver_result(sources, mask)
    seg = build_segmentation(sources, mask, result)
    assert seg is not None
    path = write_dataset(seg, tmp_path / "seg.dcm")
    _assert_valid(path)

    again = hd.seg.Segmentation.from_dataset(_round_trip(seg))
    assert again.SOPInstanceUID == result.uids.seg_sop_uid
    assert again.SeriesInstanceUID == result.uids.seg_series_uid
    read = hd.seg.segread(path)
    assert read.SegmentationType == "BINARY"
    assert [(s.SegmentNumber, s.SegmentLabel) for s in read.SegmentSequence] == [(1, "liver")]
    segment = read.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    identification = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert identification.AlgorithmName == "spleen_ct_segmentation"
    assert identification.AlgorithmVersion == "0.5.1"
    family = identification.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
    assert segment.TrackingUID == segment_tracking_uid(result, LIVER)


def test_seg_frames_land_on_their_source_instances_when_sources_come_shuffled(
    sources: list[Dataset],
) -> None:
    mask = box_mask(sources)
    order = list(range(len(sources)))
    random.Random(7).shuffle(order)
    assert order != sorted(order)
    shuffled = [sources[i] for i in order]
    shuffled_mask = mask[order]
    seg = build_segmentation(shuffled, shuffled_mask, _liver_result(shuffled, shuffled_mask))
    assert seg is not None

    read = hd.seg.Segmentation.from_dataset(_round_trip(seg))
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=_uids(sources), segment_numbers=[1], combine_segments=True
    )
    np.testing.assert_array_equal(pixels, mask)
    for frame in read.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence
        assert len(referenced) == 1
        source = next(
            s for s in sources if s.SOPInstanceUID == referenced[0].ReferencedSOPInstanceUID
        )
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
            atol=1e-3,
        )
    # the frame order does not depend on the order the caller passed the sources in
    in_order = build_segmentation(sources, mask, _liver_result(sources, mask))
    assert in_order is not None
    assert _frame_sources(seg) == _frame_sources(in_order)


def _frame_sources(seg: Dataset) -> list[tuple[str, ...]]:
    """Referenced source SOP Instance UIDs of each frame, in frame order."""
    return [
        tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in frame.DerivationImageSequence[0].SourceImageSequence
        )
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]


def test_seg_built_from_the_dcmqi_liver_mask_matches_dcmqi_per_source_instance(
    tmp_path: Path,
) -> None:
    ct = liver_ct()
    dcmqi = hd.seg.segread(DCMQI_LIVER_SEG)
    # dcmqi does not state SpatialLocationsPreserved; its frames are on the source planes
    dcmqi_mask = dcmqi.get_pixels_by_source_instance(
        source_sop_instance_uids=_uids(ct),
        segment_numbers=[1],
        combine_segments=True,
        ignore_spatial_locations=True,
    )
    assert dcmqi_mask.shape == (3, 512, 512)
    assert all(np.any(dcmqi_mask, axis=(1, 2)))
    (liver,) = segment_results(dcmqi_mask, ct, [LIVER])
    ours = build_segmentation(ct, dcmqi_mask, job_result(ct, (liver,)))
    assert ours is not None
    _assert_valid(write_dataset(ours, tmp_path / "ours.dcm"))

    def frame_sources(seg: Dataset) -> list[tuple[float, tuple[str, ...]]]:
        return sorted(
            (
                round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]), 3),
                tuple(
                    str(item.ReferencedSOPInstanceUID)
                    for item in frame.DerivationImageSequence[0].SourceImageSequence
                ),
            )
            for frame in seg.PerFrameFunctionalGroupsSequence
        )

    assert frame_sources(ours) == frame_sources(dcmqi)
    assert {uids for _, uids in frame_sources(ours)} == {(uid,) for uid in _uids(ct)}
    read = hd.seg.Segmentation.from_dataset(_round_trip(ours))
    np.testing.assert_array_equal(
        read.get_pixels_by_source_instance(
            source_sop_instance_uids=_uids(ct), segment_numbers=[1], combine_segments=True
        ),
        dcmqi_mask,
    )
    assert read.get_source_image_uids() == dcmqi.get_source_image_uids()


def test_seg_keeps_the_patient_and_study_of_its_sources(sources: list[Dataset]) -> None:
    mask = box_mask(sources)
    seg = build_segmentation(sources, mask, _liver_result(sources, mask))
    assert seg is not None
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        assert seg.get(keyword) == sources[0].get(keyword), keyword
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.Modality == "SEG"


def test_seg_includes_empty_segments_only_when_asked(tmp_path: Path) -> None:
    ct = liver_ct()
    mask = box_mask(ct, label=2)  # spleen detected, liver not
    result = _liver_result(ct, mask)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen"]
    assert seg.SegmentSequence[0].SegmentNumber == 1

    with_empty = build_segmentation(ct, mask, result, include_empty=True)
    assert with_empty is not None
    assert [s.SegmentLabel for s in with_empty.SegmentSequence] == ["liver", "spleen"]
    _assert_valid(write_dataset(with_empty, tmp_path / "with_empty.dcm"))
    read = hd.seg.Segmentation.from_dataset(_round_trip(with_empty))
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=_uids(ct), segment_numbers=[1, 2], combine_segments=True
    )
    np.testing.assert_array_equal(pixels, mask)


def test_seg_accepts_a_boolean_mask_and_header_only_sources(tmp_path: Path) -> None:
    paths = sorted(Path(ds.filename) for ds in liver_ct())
    headers = [read_header(path) for path in paths]
    assert all("PixelData" not in ds for ds in headers)
    mask = box_mask(headers).astype(bool)
    (liver,) = segment_results(mask, liver_ct(), [LIVER])
    seg = build_segmentation(headers, mask, job_result(headers, (liver,)))
    assert seg is not None
    _assert_valid(write_dataset(seg, tmp_path / "seg.dcm"))
    read = hd.seg.Segmentation.from_dataset(_round_trip(seg))
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=_uids(headers), segment_numbers=[1], combine_segments=True
    )
    np.testing.assert_array_equal(pixels.astype(bool), mask)


def test_mean_hu_needs_the_pixel_data_of_ct_sources() -> None:
    headers = [read_header(Path(ds.filename)) for ds in liver_ct()]
    with pytest.raises(ValueError, match="no pixel data"):
        segment_results(box_mask(headers), headers, SPECS)


def test_seg_refuses_a_result_that_disagrees_with_the_mask() -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    empty = _liver_result(ct, np.zeros_like(mask))
    with pytest.raises(ValueError, match="disagree"):
        build_segmentation(ct, mask, empty)


def test_seg_and_sr_uids_are_the_same_when_the_job_is_built_twice(sources: list[Dataset]) -> None:
    mask = box_mask(sources)
    first_result = _liver_result(sources, mask)
    second_result = _liver_result(list(reversed(sources)), mask[::-1])
    assert first_result.uids == second_result.uids
    first = build_segmentation(sources, mask, first_result)
    second = build_segmentation(list(reversed(sources)), mask[::-1], second_result)
    assert first is not None and second is not None
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        second.SOPInstanceUID,
        second.SeriesInstanceUID,
    )
    sr_first = build_measurement_report(sources, first, first_result)
    sr_second = build_measurement_report(sources, second, second_result)
    assert (sr_first.SOPInstanceUID, sr_first.SeriesInstanceUID) == (
        sr_second.SOPInstanceUID,
        sr_second.SeriesInstanceUID,
    )
    assert (
        len(
            {
                first.SOPInstanceUID,
                first.SeriesInstanceUID,
                sr_first.SOPInstanceUID,
                sr_first.SeriesInstanceUID,
            }
        )
        == 4
    )
    newer = job_result(sources, first_result.segments, algorithm(version="0.6.0"))
    assert newer.uids.seg_sop_uid != first_result.uids.seg_sop_uid


# --- SR ----------------------------------------------------------------------------------


def test_sr_passes_dciodvfy_and_dsrdump_and_round_trips_through_highdicom(
    sources: list[Dataset], tmp_path: Path
) -> None:
    mask = box_mask(sources)
    result = _liver_result(sources, mask)
    seg = build_segmentation(sources, mask, result)
    assert seg is not None
    report = build_measurement_report(sources, seg, result)
    path = write_dataset(report, tmp_path / "sr.dcm")
    _assert_valid(path)
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout

    again = hd.sr.Comprehensive3DSR.from_dataset(_round_trip(report))
    assert again.SOPInstanceUID == result.uids.sr_sop_uid
    assert again.SeriesInstanceUID == result.uids.sr_series_uid
    read = hd.sr.srread(path)
    assert isinstance(read, hd.sr.Comprehensive3DSR)
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == {*_uids(sources), str(seg.SOPInstanceUID)}


def test_sr_reports_volume_mean_hu_and_algorithm_of_each_detected_segment(
    sources: list[Dataset],
) -> None:
    mask = box_mask(sources)
    mask[-1, -2:, -2:] = 2
    result = _liver_result(sources, mask)
    seg = build_segmentation(sources, mask, result)
    assert seg is not None
    report = hd.sr.Comprehensive3DSR.from_dataset(
        _round_trip(build_measurement_report(sources, seg, result))
    )
    groups = _content(report).get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    seg_numbers = {str(s.TrackingUID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    for group, segment in zip(groups, result.segments, strict=True):
        assert group.finding_type is not None
        assert group.finding_type.value == segment.segment.type.value
        assert group.finding_category is not None
        assert group.finding_category.value == segment.segment.category.value
        assert group.tracking_uid == segment_tracking_uid(result, segment.segment)
        assert group.tracking_identifier == segment.segment.label
        referenced = group.referenced_segment
        assert referenced is not None
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [seg_numbers[group.tracking_uid]]
        source_series = referenced.source_series_for_segmentation
        assert source_series is not None
        assert source_series.value == sources[0].SeriesInstanceUID
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(segment.volume_mm3)
        assert volume.unit == codes.UCUM.CubicMillimeter
        assert _algorithm_of(volume) == {
            "Algorithm Name": "spleen_ct_segmentation",
            "Algorithm Version": "0.5.1",
            "Algorithm Manufacturer": "pacs-agent",
            "Algorithm Family": "Artificial Intelligence",
        }
        (attenuation,) = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert attenuation.value == pytest.approx(segment.mean_hu)
        assert attenuation.unit.value == "[hnsf'U]"
        assert attenuation.derivation == codes.SCT.Mean
        assert _algorithm_of(attenuation) == _algorithm_of(volume)
        type_code = segment.segment.type
        (presence,) = group.get_qualitative_evaluations(
            name=hd.sr.CodedConcept(type_code.value, type_code.scheme, type_code.meaning)
        )
        assert presence.value == codes.cid240.Present


def _algorithm_of(measurement: hd.sr.Measurement) -> dict[str, str]:
    """The TID 4019 items under a measurement: concept meaning -> value."""
    found = {}
    for item in measurement[0].ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if meaning.startswith("Algorithm"):
            found[meaning] = (
                item.TextValue
                if item.ValueType == "TEXT"
                else item.ConceptCodeSequence[0].CodeMeaning
            )
    return found


def test_sr_says_not_detected_and_no_seg_is_built_when_nothing_is_found(tmp_path: Path) -> None:
    ct = liver_ct()
    mask = np.zeros((3, 512, 512), dtype=np.uint8)
    result = _liver_result(ct, mask)
    assert build_segmentation(ct, mask, result) is None
    report = build_measurement_report(ct, None, result)
    path = write_dataset(report, tmp_path / "sr.dcm")
    _assert_valid(path)
    assert dsrdump(path).returncode == 0
    read = hd.sr.srread(path)
    assert _content(read).get_volumetric_roi_measurement_groups() == []
    assert _content(read).get_planar_roi_measurement_groups() == []
    findings = _absent_findings(read)
    assert findings == {LIVER.type.value, SPLEEN.type.value}


def _with_thresholds(spec: SegmentSpec, **criteria: float) -> SegmentSpec:
    return replace(spec, detection=DetectionCriteria(**criteria))  # type: ignore[arg-type]


def _two_blobs_and_specks(ct: Sequence[Dataset]) -> np.ndarray:
    """Label 1: a 3 x 20 x 20 blob, a 3 x 10 x 10 blob and four single voxels; label 2: three
    single voxels."""
    mask = np.zeros((3, 512, 512), dtype=np.uint8)
    mask[:, 200:220, 200:220] = 1
    mask[:, 300:310, 100:110] = 1
    mask[0, 10, 10] = mask[1, 400, 30] = mask[2, 50, 480] = mask[2, 500, 500] = 1
    mask[0, 60, 60] = mask[1, 450, 450] = mask[2, 20, 300] = 2
    return mask


def test_sr_reports_the_kept_components_and_the_largest_ones_volume(tmp_path: Path) -> None:
    ct = liver_ct()
    specs = [
        _with_thresholds(LIVER, min_volume_mm3=100.0, min_component_mm3=2.0),
        _with_thresholds(SPLEEN, min_volume_mm3=100.0, min_component_mm3=2.0),
    ]
    raw = _two_blobs_and_specks(ct)
    measured = measure_segments(raw, ct, specs)
    result = job_result(ct, measured.segments)
    # The model's own mask still holds the specks: the SEG refuses it.
    with pytest.raises(ValueError, match="the mask has 1504 voxels, the result counts 1500"):
        build_segmentation(ct, raw, result)
    seg = build_segmentation(ct, measured.mask, result)
    assert seg is not None
    assert [str(item.SegmentLabel) for item in seg.SegmentSequence] == ["liver"]
    pixels = hd.seg.Segmentation.from_dataset(_round_trip(seg)).get_pixels_by_source_instance(
        source_sop_instance_uids=_uids(ct), segment_numbers=[1]
    )
    assert int(pixels.sum()) == 3 * (400 + 100)  # the two blobs, not the specks

    report = build_measurement_report(ct, seg, result)
    path = write_dataset(report, tmp_path / "sr.dcm")
    _assert_valid(path)
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Connected component count" in dump.stdout
    read = hd.sr.srread(path)
    (scheme,) = read.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeName) == (
        "99PACSAGENT",
        "pacs-agent private codes",
    )
    (group,) = _content(read).get_volumetric_roi_measurement_groups()
    liver = measured.segments[0]
    (count,) = group.get_measurements(name=COMPONENT_COUNT)
    assert count.value == 2 and count.unit == codes.UCUM.NoUnits
    (largest,) = group.get_measurements(name=LARGEST_COMPONENT_VOLUME)
    voxel = voxel_volume_mm3(ct)
    assert largest.value == pytest.approx(1200 * voxel)
    assert largest.unit == codes.UCUM.CubicMillimeter
    assert _algorithm_of(largest)["Algorithm Name"] == "spleen_ct_segmentation"
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == pytest.approx(1500 * voxel) == pytest.approx(liver.volume_mm3)
    assert _absent_findings(read) == {SPLEEN.type.value}


def test_sr_of_specks_only_says_absent_with_no_seg_and_no_private_codes(tmp_path: Path) -> None:
    ct = liver_ct()
    raw = _two_blobs_and_specks(ct)
    raw[raw == 1] = 0  # only label 2's three single voxels remain
    specs = [_with_thresholds(s, min_component_mm3=2.0) for s in SPECS]
    measured = measure_segments(raw, ct, specs)
    result = job_result(ct, measured.segments)
    assert not any(s.detected for s in result.segments)
    assert build_segmentation(ct, measured.mask, result) is None
    path = write_dataset(build_measurement_report(ct, None, result), tmp_path / "sr.dcm")
    _assert_valid(path)
    read = hd.sr.srread(path)
    assert "CodingSchemeIdentificationSequence" not in read
    assert _absent_findings(read) == {LIVER.type.value, SPLEEN.type.value}


def _absent_findings(report: Dataset) -> set[str]:
    """Finding types whose group says Absent (CID 240: SCT 272519000)."""
    absent: set[str] = set()
    measurements = report.ContentSequence[-1]
    for group in measurements.ContentSequence:
        finding = None
        verdict = None
        for item in group.ContentSequence:
            name = item.ConceptNameCodeSequence[0]
            if (name.CodeValue, name.CodingSchemeDesignator) == ("121071", "DCM"):
                finding = item.ConceptCodeSequence[0].CodeValue
            elif item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeValue in (
                "272519000",
                "52101004",
            ):
                verdict = item.ConceptCodeSequence[0].CodeValue
        if finding is not None and verdict == "272519000":
            absent.add(str(finding))
    return absent


def test_sr_mixes_detected_and_absent_segments(tmp_path: Path) -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    seg = build_segmentation(ct, mask, result)
    report = build_measurement_report(ct, seg, result)
    _assert_valid(write_dataset(report, tmp_path / "sr.dcm"))
    assert _absent_findings(report) == {SPLEEN.type.value}
    read = hd.sr.Comprehensive3DSR.from_dataset(_round_trip(report))
    assert len(_content(read).get_volumetric_roi_measurement_groups()) == 1


def test_sr_observer_is_the_model_as_a_device() -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    report = build_measurement_report(ct, build_segmentation(ct, mask, result), result)
    context = report.content[0].ContentSequence
    values = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.get("UID", item.get("TextValue"))
        for item in context
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert values["Device Observer UID"] == result.algorithm.device_uid
    assert values["Device Observer Model Name"] == "spleen_ct_segmentation"
    assert "0.5.1" in values["Device Observer Name"]


def test_procedure_reported_comes_from_the_study_or_a_modality_default() -> None:
    ct = liver_ct()[0]
    assert procedure_reported(ct).value == "25045-6"  # CT unspecified body region
    mr_path = pydicom.data.get_testdata_file("MR_small.dcm", download=False)
    assert isinstance(mr_path, str)
    assert procedure_reported(pydicom.dcmread(mr_path)).value == "25056-3"
    other = Dataset()
    other.Modality = "OT"
    assert procedure_reported(other).value == "363679005"  # Imaging procedure
    coded = Dataset()
    coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = (
        "24627-2",
        "LN",
        "CT Chest",
    )
    ct.ProcedureCodeSequence = [coded]
    assert procedure_reported(ct).value == "24627-2"


def test_sr_refuses_a_detected_segment_without_a_seg() -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    with pytest.raises(ValueError, match="no segment"):
        build_measurement_report(ct, None, _liver_result(ct, mask))


# --- classification results --------------------------------------------------------------


def _groups(report: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return list(_content(report).get_image_measurement_groups())


def test_classification_sr_reports_each_finding_with_its_probability_and_presence(
    tmp_path: Path,
) -> None:
    ct = liver_ct()
    result = job_result(ct, (), classifications=classifications(0.91, 0.12))
    report = build_measurement_report(ct, None, result)
    path = write_dataset(report, tmp_path / "sr.dcm")
    _assert_valid(path)
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Probability" in dump.stdout and "Pneumothorax" in dump.stdout

    read = hd.sr.srread(path)
    groups = _groups(read)
    assert len(groups) == 2
    seen = {}
    for index, group in enumerate(groups):
        finding = group.finding_type
        assert finding is not None
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        (evaluation,) = group.get_qualitative_evaluations(
            name=hd.sr.CodedConcept(finding.value, finding.scheme_designator, finding.meaning)
        )
        assert group.tracking_uid == classification_tracking_uid(result, index)
        assert probability.unit == codes.UCUM.NoUnits
        seen[finding.value] = (float(probability.value), evaluation.value)
    assert seen == {
        PNEUMOTHORAX.value: (0.91, codes.cid240.Present),
        NODULE.value: (0.12, codes.cid240.Absent),  # below the card's 0.3 threshold
    }
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == set(_uids(ct))


def test_sr_of_a_model_that_segments_and_classifies_holds_both_kinds_of_group(
    tmp_path: Path,
) -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    result = job_result(
        ct, segment_results(mask, ct, SPECS), classifications=classifications(0.2, 0.8)
    )
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    report = build_measurement_report(ct, seg, result)
    _assert_valid(write_dataset(report, tmp_path / "sr.dcm"))
    read = hd.sr.srread(tmp_path / "sr.dcm")
    assert len(_content(read).get_volumetric_roi_measurement_groups()) == 1  # the liver
    assert len(_groups(read)) == 3  # spleen absent, two classifications


def test_sr_refuses_a_result_with_nothing_to_report() -> None:
    ct = liver_ct()
    with pytest.raises(ValueError, match="neither segments nor classifications"):
        build_measurement_report(ct, None, job_result(ct, ()))


def test_tracking_uids_live_under_the_configured_uid_root_and_match_between_seg_and_sr(
    tmp_path: Path,
) -> None:
    root = "1.2.826.0.1.3680043.8.498"
    ct = liver_ct()
    mask = box_mask(ct)
    result = job_result(
        ct, segment_results(mask, ct, SPECS), root=root, classifications=classifications(0.9, 0.9)
    )
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    report = build_measurement_report(ct, seg, result)
    seg_tracking = [str(item.TrackingUID) for item in seg.SegmentSequence]
    assert seg_tracking == [segment_tracking_uid(result, LIVER)]
    content = _content(hd.sr.srread(write_dataset(report, tmp_path / "sr.dcm")))
    (volumetric,) = content.get_volumetric_roi_measurement_groups()
    assert volumetric.tracking_uid == seg_tracking[0]
    uids = [
        seg.SOPInstanceUID,
        seg.SeriesInstanceUID,
        report.SOPInstanceUID,
        report.SeriesInstanceUID,
        *seg_tracking,
        segment_tracking_uid(result, SPLEEN),
        classification_tracking_uid(result, 0),
        classification_tracking_uid(result, 1),
    ]
    assert all(str(uid).startswith(root + ".") and len(str(uid)) <= 64 for uid in uids)
    assert len(set(uids)) == len(uids)


def test_device_uid_in_contributing_equipment_changes_when_the_model_version_changes() -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    device_uids = set()
    for version in ("0.5.1", "0.6.0"):
        result = job_result(ct, segment_results(mask, ct, SPECS), algorithm(version=version))
        seg = build_segmentation(ct, mask, result)
        assert seg is not None
        report = build_measurement_report(ct, seg, result)
        (seg_item,) = [i for i in seg.ContributingEquipmentSequence if "DeviceUID" in i]
        (sr_item,) = [i for i in report.ContributingEquipmentSequence if "DeviceUID" in i]
        assert seg_item.DeviceUID == sr_item.DeviceUID == result.algorithm.device_uid
        device_uids.add(str(seg_item.DeviceUID))
    assert len(device_uids) == 2


# --- AI marking and IHE AIR contributing equipment ---------------------------------------


@pytest.mark.parametrize("clinical_use", [False, True])
def test_results_mark_ai_and_name_the_model_in_contributing_equipment(
    clinical_use: bool,
) -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    model = algorithm(clinical_use=clinical_use)
    result = job_result(ct, segment_results(mask, ct, SPECS), model)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    report = build_measurement_report(ct, seg, result)
    for ds, kind in ((seg, "SEG"), (report, "SR")):
        assert ds.SeriesDescription.startswith(f"AI {kind}: spleen_ct_segmentation 0.5.1")
        assert ("not for clinical use" in ds.SeriesDescription) is not clinical_use
        assert len(ds.SeriesDescription) <= 64
        assert ds.Manufacturer == "pacs-agent"
        models = [
            item
            for item in ds.ContributingEquipmentSequence
            if item.get("DeviceUID") == model.device_uid
        ]
        assert len(models) == 1
        item = models[0]
        assert item.ManufacturerModelName == "spleen_ct_segmentation"
        assert item.SoftwareVersions == "0.5.1"
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_series_description_stays_within_64_characters_for_long_model_names() -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    model = algorithm(name="a_very_long_model_name_" * 4, version="12.34.56")
    seg = build_segmentation(ct, mask, job_result(ct, segment_results(mask, ct, SPECS), model))
    assert seg is not None
    assert len(seg.SeriesDescription) <= 64
    assert seg.SeriesDescription.endswith("(not for clinical use)")


def test_results_switch_to_utf8_for_a_model_name_outside_ascii(tmp_path: Path) -> None:
    ct = pydicom_ct5n()
    assert ct[0].SpecificCharacterSet == "ISO_IR 100"
    mask = box_mask(ct)
    model = algorithm(name="modèle_rate_胝")
    result = job_result(ct, segment_results(mask, ct, SPECS), model)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    report = build_measurement_report(ct, seg, result)
    for ds, name in ((seg, "seg.dcm"), (report, "sr.dcm")):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        path = write_dataset(ds, tmp_path / name)
        _assert_valid(path)
        again = pydicom.dcmread(path)
        assert again.ManufacturerModelName == model.name
        assert again.PatientName == ct[0].PatientName
    unchanged = build_segmentation(ct, mask, job_result(ct, result.segments))
    assert unchanged is not None
    assert unchanged.SpecificCharacterSet == "ISO_IR 100"


# --- io ----------------------------------------------------------------------------------


def test_write_dataset_writes_a_part10_file_and_replaces_an_old_one(tmp_path: Path) -> None:
    ct = liver_ct()
    mask = box_mask(ct)
    seg = build_segmentation(ct, mask, _liver_result(ct, mask))
    assert seg is not None
    target = tmp_path / "out" / "seg.dcm"
    assert write_dataset(seg, target) == target
    raw = target.read_bytes()
    assert raw[128:132] == b"DICM"
    target.write_bytes(b"old")
    write_dataset(seg, target)
    assert target.read_bytes() == raw
    assert os.listdir(target.parent) == ["seg.dcm"]
    header = read_header(target)
    assert "PixelData" not in header
    assert header.SOPInstanceUID == seg.SOPInstanceUID


def test_write_dataset_leaves_neither_target_nor_temp_file_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct = liver_ct()

    def fail(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_dataset(ct[0], tmp_path / "ct.dcm")
    assert list(tmp_path.iterdir()) == []


# --- sources that leave type 2 attributes out ---------------------------------------------

#: Type 2 attributes of the Patient (PS3.3 C.7.1.1), General Study (C.7.2.1) and General
#: Series (C.7.3.1) modules; Laterality and Patient Position are type 2C there.
TYPE2_OF_SOURCES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "Laterality",
    "PatientPosition",
)


def _encoded(datasets: Sequence[Dataset]) -> list[bytes]:
    out = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _without(datasets: list[Dataset], keywords: Sequence[str]) -> list[Dataset]:
    for ds in datasets:
        for keyword in keywords:
            if keyword in ds:
                del ds[keyword]
    return datasets


@pytest.mark.parametrize("keyword", TYPE2_OF_SOURCES)
def test_seg_and_sr_of_sources_without_a_type_2_attribute_write_it_empty_and_stay_valid(
    keyword: str, tmp_path: Path
) -> None:
    ct = _without(liver_ct(), [keyword])
    before = _encoded(ct)
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    sr = build_measurement_report(ct, seg, result)
    for name, obj in (("seg", seg), ("sr", sr)):
        errors, _ = dciodvfy_errors(write_dataset(obj, tmp_path / f"{name}.dcm"))
        assert errors == [], name
        if keyword in TYPE2_COPIED:
            # Present and empty: "unknown", as the source said by leaving it out.
            assert keyword in obj and obj[keyword].is_empty, (name, keyword)
    # The General Series attributes are the results' own.
    assert seg.SeriesNumber == 9001 and sr.SeriesNumber == 9002
    # The sources are exactly as they were (nothing patched into them).
    assert _encoded(ct) == before
    assert all(keyword not in ds for ds in ct)


def test_results_of_a_source_without_patient_id_study_id_and_study_date_are_valid(
    tmp_path: Path,
) -> None:
    """The report that started this: an old (or de-identified) image without PatientID,
    StudyID and StudyDate; every other copied value still comes from the source."""
    ct = _without(liver_ct(), ["PatientID", "StudyID", "StudyDate"])
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    sr = build_measurement_report(ct, seg, result)
    for name, obj in (("seg", seg), ("sr", sr)):
        path = write_dataset(obj, tmp_path / f"{name}.dcm")
        assert dciodvfy_errors(path)[0] == [], name
        read = pydicom.dcmread(path)
        assert read.PatientID == "" and read.StudyID == "" and read.StudyDate == ""
        assert read.PatientName == ct[0].PatientName
        assert read.AccessionNumber == ct[0].AccessionNumber
        assert read.StudyInstanceUID == ct[0].StudyInstanceUID


def test_building_results_puts_no_patient_name_in_warnings_or_log_records(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    ct = liver_ct()  # a one-component name, which highdicom warns about, quoting it
    name = str(ct[0].PatientName)
    caplog.set_level(logging.DEBUG)
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    build_measurement_report(ct, build_segmentation(ct, mask, result), result)
    texts = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert texts and not [t for t in texts if name in t]


def test_a_patient_sex_outside_its_enumerated_values_is_written_empty(tmp_path: Path) -> None:
    ct = liver_ct()
    for ds in ct:
        ds.PatientSex = "MALE"  # not M, F or O: highdicom refuses it
    mask = box_mask(ct)
    result = _liver_result(ct, mask)
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    sr = build_measurement_report(ct, seg, result)
    for name, obj in (("seg", seg), ("sr", sr)):
        assert dciodvfy_errors(write_dataset(obj, tmp_path / f"{name}.dcm"))[0] == []
        assert obj.PatientSex in (None, "")
    assert ct[0].PatientSex == "MALE"


# --- a multi-frame source (enhanced CT, one file) ------------------------------------------


@pytest.fixture(scope="module")
def enhanced_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, list[Dataset]]:
    """The real 20-slice CT as a Legacy Converted Enhanced CT image, and its repaired slices."""
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"real CT test data missing at {REAL_CT_DIR}")
    folder = tmp_path_factory.mktemp("enhanced")
    path = enhanced_real_ct(folder)
    slices = [pydicom.dcmread(p) for p in repair_real_ct(REAL_CT_DIR, folder / "again")]
    return pydicom.dcmread(path), slices


def _frame_boxes(frames: int, rows: int, columns: int) -> np.ndarray:
    """Label 1 in a different box on frames 4..9, nothing elsewhere."""
    mask = np.zeros((frames, rows, columns), dtype=np.uint8)
    for f in range(3, 9):
        mask[f, 150 + 10 * f : 230 + 10 * f, 200 : 260 + 5 * f] = 1
    return mask


def _by_position(planes: Sequence[Dataset]) -> dict[tuple[float, ...], int]:
    return {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): i for i, ds in enumerate(planes)
    }


def test_plane_headers_give_each_frame_of_an_enhanced_ct_the_geometry_of_its_slice(
    enhanced_ct: tuple[Dataset, list[Dataset]],
) -> None:
    multi, slices = enhanced_ct
    planes = plane_headers([multi])
    assert len(planes) == 20 and all("PixelData" not in p for p in planes)
    single = _by_position(slices)
    assert set(_by_position(planes)) == set(single)
    for plane in planes:
        twin = slices[single[tuple(round(float(v), 3) for v in plane.ImagePositionPatient)]]
        assert [float(v) for v in plane.ImageOrientationPatient] == [
            float(v) for v in twin.ImageOrientationPatient
        ]
        assert [float(v) for v in plane.PixelSpacing] == [float(v) for v in twin.PixelSpacing]
        assert float(plane.RescaleIntercept) == float(twin.RescaleIntercept)
    assert plane_headers(slices) == slices  # single-frame instances are their own headers


def test_segment_results_of_an_enhanced_ct_equal_those_of_its_single_frame_slices(
    enhanced_ct: tuple[Dataset, list[Dataset]],
) -> None:
    multi, slices = enhanced_ct
    mask = _frame_boxes(20, 512, 512)
    index = _by_position(slices)
    on_slices = np.zeros_like(mask)
    for f, plane in enumerate(plane_headers([multi])):
        on_slices[index[tuple(round(float(v), 3) for v in plane.ImagePositionPatient)]] = mask[f]
    (multi_result,) = segment_results(mask, [multi], [LIVER])
    (slice_result,) = segment_results(on_slices, slices, [LIVER])
    assert multi_result.voxel_count == slice_result.voxel_count == int(mask.sum())
    assert multi_result.volume_mm3 == pytest.approx(slice_result.volume_mm3)
    assert multi_result.mean_hu is not None and slice_result.mean_hu is not None
    assert multi_result.mean_hu == pytest.approx(slice_result.mean_hu)


def test_seg_of_an_enhanced_ct_references_the_source_frames_and_the_sr_is_valid(
    enhanced_ct: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    multi, _ = enhanced_ct
    mask = _frame_boxes(20, 512, 512)
    result = job_result([multi], segment_results(mask, [multi], [LIVER]))
    seg = build_segmentation([multi], mask, result)
    assert seg is not None
    seg_path = write_dataset(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg_path)[0] == []
    read = hd.seg.segread(seg_path)
    referenced = [
        (
            str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
            int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber),
        )
        for item in read.PerFrameFunctionalGroupsSequence
    ]
    assert referenced == [(str(multi.SOPInstanceUID), f) for f in range(4, 10)]
    pixels = read.get_pixels_by_source_frame(
        source_sop_instance_uid=str(multi.SOPInstanceUID),
        source_frame_numbers=list(range(1, 21)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels, mask)

    sr = build_measurement_report([multi], seg, result)
    sr_path = write_dataset(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path)[0] == []
    assert dsrdump(sr_path).returncode == 0
    (group,) = _content(hd.sr.srread(sr_path)).get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is not None
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == {str(multi.SOPInstanceUID), result.uids.seg_sop_uid}


def test_seg_refuses_a_multi_frame_image_mixed_with_other_instances(
    enhanced_ct: tuple[Dataset, list[Dataset]],
) -> None:
    multi, slices = enhanced_ct
    mask = np.zeros((21, 512, 512), dtype=np.uint8)
    with pytest.raises(ValueError, match="one multi-frame image or single-frame instances"):
        build_segmentation([multi, slices[0]], mask, job_result([multi], ()))
