"""Every object the project emits is valid DICOM: zero dciodvfy errors, a round trip through
highdicom's readers (SEG masks back on their source instances), and dsrdump reads the SR.

The objects are made the way the inference worker makes them (measure_segments, deterministic
UIDs, build_segmentation, build_measurement_report) from real model outputs: the demo
segmentation bundle on a synthetic CT study, the unchanged Model Zoo spleen and whole-body
bundles (seeded random weights: no pretrained weights can be downloaded here) on the real
JPEG 2000 CT, the demo classifier on synthetic CR and DX radiographs; plus a not-detected SR
and a classification SR on the real CT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom import Dataset
from pydicom.data import get_testdata_file

from pacs_agent.catalog import read_card
from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from pacs_agent.demo.synthetic import make_ct_study_with_truth
from pacs_agent.dicom.geometry import measure_segments, plane_headers
from pacs_agent.dicom.io import write_dataset
from pacs_agent.dicom.seg import build_segmentation
from pacs_agent.dicom.sources import TYPE2_COPIED
from pacs_agent.dicom.sr import (
    COMPONENT_COUNT,
    LARGEST_COMPONENT_VOLUME,
    build_measurement_report,
)
from pacs_agent.dicom.volume import plan_volume
from pacs_agent.domain.results import (
    AlgorithmSpec,
    ClassificationResult,
    CodedConcept,
    JobResult,
    ResultUIDs,
    SegmentSpec,
)
from pacs_agent.domain.uids import device_uid, job_result_uids
from tests.helpers.dicom_results import dciodvfy_errors, dsrdump
from tests.helpers.paths import MODEL_ZOO
from tests.helpers.realct import REAL_CT_DIR, enhanced_real_ct, repair_real_ct
from workers.runtime.bundle import BundleRunner, labels_on_frames
from workers.runtime.series import RunnerCache, run_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = ROOT / "workers" / "bundles" / "demo_ct_blob_seg"
DEMO_CLASSIFIER = ROOT / "workers" / "bundles" / "demo_cr_nodule_cls"
SPLEEN_BUNDLE = MODEL_ZOO / "spleen_ct_segmentation"
WHOLE_BODY_BUNDLE = MODEL_ZOO / "wholeBody_ct_segmentation"
#: A configured UID root other than 2.25, so that every derived UID is seen to use it.
UID_ROOT = "1.2.826.0.1.3680043.8.498"

SPLEEN = SegmentSpec(
    1,
    "spleen",
    CodedConcept("123037004", "SCT", "Anatomical Structure"),
    CodedConcept("78961009", "SCT", "Spleen"),
)


def _uids(sources: Sequence[Dataset], model: AlgorithmSpec) -> ResultUIDs:
    return ResultUIDs(
        *job_result_uids(
            UID_ROOT,
            str(sources[0].StudyInstanceUID),
            str(sources[0].SeriesInstanceUID),
            model.name,
            model.version,
        )
    )


def _emit(
    sources: Sequence[Dataset],
    mask: np.ndarray | None,
    model: AlgorithmSpec,
    specs: Sequence[SegmentSpec],
    out: Path,
    classifications: tuple[ClassificationResult, ...] = (),
) -> tuple[Path | None, Path, JobResult, np.ndarray | None]:
    """SEG and SR files of the model's ``mask``, the result, and the mask the SEG carries
    (without the components and segments the card's thresholds drop)."""
    measured = measure_segments(mask, sources, specs) if mask is not None else None
    result = JobResult(
        algorithm=model,
        segments=measured.segments if measured is not None else (),
        uids=_uids(sources, model),
        classifications=classifications,
    )
    seg = build_segmentation(sources, measured.mask, result) if measured is not None else None
    sr = build_measurement_report(sources, seg, result)
    seg_path = write_dataset(seg, out / "seg.dcm") if seg is not None else None
    kept = measured.mask if measured is not None else None
    return seg_path, write_dataset(sr, out / "sr.dcm"), result, kept


def _assert_seg_valid(path: Path, sources: Sequence[Dataset], mask: np.ndarray) -> None:
    errors, _ = dciodvfy_errors(path)
    assert errors == []
    seg = hd.seg.segread(path)
    assert seg.SeriesInstanceUID.startswith(UID_ROOT + ".")
    assert all(str(item.TrackingUID).startswith(UID_ROOT + ".") for item in seg.SegmentSequence)
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=numbers,
        combine_segments=True,
    )
    np.testing.assert_array_equal(pixels > 0, mask > 0)


def _assert_sr_valid(path: Path, result: JobResult) -> hd.sr.MeasurementReport:
    errors, _ = dciodvfy_errors(path)
    assert errors == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPInstanceUID == result.uids.sr_sop_uid
    assert sr.SeriesDescription.startswith("AI SR: ")
    (item,) = [i for i in sr.ContributingEquipmentSequence if "DeviceUID" in i]
    assert item.DeviceUID == result.algorithm.device_uid
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Dataset]]:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"real CT test data missing at {REAL_CT_DIR}")
    folder = tmp_path_factory.mktemp("realct")
    paths = repair_real_ct(REAL_CT_DIR, folder)
    return folder, [pydicom.dcmread(p) for p in paths]


def test_demo_bundle_objects_on_a_synthetic_study_are_valid(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    sources, _ = make_ct_study_with_truth(folder, seed=2024)
    card = read_card(DEMO_BUNDLE)
    mask = BundleRunner(DEMO_BUNDLE, device="cpu").segment(folder, sources)
    assert mask.any()
    full = [pydicom.dcmread(path) for path in sorted(folder.glob("CT*.dcm"))]
    assert [ds.SOPInstanceUID for ds in full] == [ds.SOPInstanceUID for ds in sources]
    model = card.algorithm(UID_ROOT)
    seg_path, sr_path, result, kept = _emit(full, mask, model, card.segments, tmp_path)
    assert seg_path is not None
    assert kept is not None
    _assert_seg_valid(seg_path, full, kept)
    content = _assert_sr_valid(sr_path, result)
    (group,) = content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
    (blob,) = result.segments
    assert float(volume.value) == pytest.approx(blob.volume_mm3)
    # The card's thresholds: components under 20 mm3 are in neither the SEG nor the SR.
    (count,) = group.get_measurements(name=COMPONENT_COUNT)
    (largest,) = group.get_measurements(name=LARGEST_COMPONENT_VOLUME)
    assert blob.component_count is not None and int(count.value) == blob.component_count >= 1
    assert float(largest.value) == pytest.approx(blob.largest_component_mm3)
    assert blob.largest_component_mm3 is not None and blob.largest_component_mm3 >= 20.0


def _seeded_bundle(source: Path, target: Path) -> tuple[Path, AlgorithmSpec]:
    """``source``'s configs (linked, unchanged) with seeded random weights, and the model's
    algorithm identification (name and version from its metadata)."""
    target.mkdir()
    (target / "configs").symlink_to(source / "configs", target_is_directory=True)
    parser = ConfigParser()
    parser.read_config(str(source / "configs" / "inference.json"))
    torch.manual_seed(0)
    (target / "models").mkdir()
    torch.save(
        parser.get_parsed_content("network_def").state_dict(), target / "models" / "model.pt"
    )
    version = json.loads((source / "configs" / "metadata.json").read_text())["version"]
    model = AlgorithmSpec(
        name=source.name, version=version, device_uid=device_uid(UID_ROOT, source.name, version)
    )
    return target, model


def test_spleen_bundle_objects_on_the_real_ct_are_valid(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    folder, sources = real_ct
    bundle, model = _seeded_bundle(SPLEEN_BUNDLE, tmp_path / "spleen_ct_segmentation")
    mask = BundleRunner(bundle, device="cpu").segment(folder, sources)
    assert mask.shape == (20, 512, 512)
    # Random weights label some voxels; if none were, the test would only see the empty path.
    assert mask.any()
    seg_path, sr_path, result, kept = _emit(sources, mask, model, [SPLEEN], tmp_path)
    assert seg_path is not None
    assert kept is not None
    _assert_seg_valid(seg_path, sources, kept)
    content = _assert_sr_valid(sr_path, result)
    (group,) = content.get_volumetric_roi_measurement_groups()
    (hu,) = group.get_measurements(
        name=hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
    )
    assert result.segments[0].mean_hu is not None
    assert float(hu.value) == pytest.approx(result.segments[0].mean_hu)


def test_whole_body_bundle_objects_with_dozens_of_segments_on_the_real_ct_are_valid(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    _, sources = real_ct
    bundle, model = _seeded_bundle(WHOLE_BODY_BUNDLE, tmp_path / "wholeBody_ct_segmentation")
    runner = BundleRunner(bundle, device="cpu", overrides={"displayable_configs#highres": False})
    mask = runner.segment_series(sources, plan_volume(sources))
    metadata = json.loads((WHOLE_BODY_BUNDLE / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    # The labels by name, each coded generically (a real model card codes every structure).
    structure = CodedConcept("91723000", "SCT", "Anatomical Structure")
    category = CodedConcept("123037004", "SCT", "Anatomical Structure")
    specs = [
        SegmentSpec(int(number), label, category, structure)
        for number, label in channels.items()
        if number != "0"
    ]
    found = sorted(int(v) for v in np.unique(mask) if v)
    assert len(found) > 10  # random weights label many structures: many segments
    seg_path, sr_path, result, kept = _emit(sources, mask, model, specs, tmp_path)
    assert seg_path is not None
    assert kept is not None
    _assert_seg_valid(seg_path, sources, kept)
    seg = hd.seg.segread(seg_path)
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    assert labels == [channels[str(number)] for number in found]
    content = _assert_sr_valid(sr_path, result)
    assert len(content.get_volumetric_roi_measurement_groups()) == len(found)


def test_a_demo_model_result_with_nothing_found_on_the_real_ct_emits_a_valid_not_detected_sr(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    _, sources = real_ct
    card = read_card(DEMO_BUNDLE)
    empty = np.zeros((len(sources), 512, 512), dtype=np.uint8)
    seg_path, sr_path, result, _ = _emit(
        sources, empty, card.algorithm(UID_ROOT), card.segments, tmp_path
    )
    assert seg_path is None
    _assert_sr_valid(sr_path, result)
    dump = dsrdump(sr_path).stdout
    assert "Absent" in dump


def test_classification_sr_on_the_real_ct_is_valid(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    _, sources = real_ct
    model = AlgorithmSpec(
        name="demo_cr_nodule_cls",
        version="0.1.0",
        device_uid=device_uid(UID_ROOT, "demo_cr_nodule_cls", "0.1.0"),
    )
    findings = (
        ClassificationResult(CodedConcept("27925004", "SCT", "Nodule"), "nodule", 0.83, 0.5),
        ClassificationResult(
            CodedConcept("36118008", "SCT", "Pneumothorax"), "pneumothorax", 0.04, 0.5
        ),
    )
    seg_path, sr_path, result, _ = _emit(sources, None, model, [], tmp_path, findings)
    assert seg_path is None
    content = _assert_sr_valid(sr_path, result)
    groups = content.get_image_measurement_groups()
    assert len(groups) == 2
    assert all(str(g.tracking_uid).startswith(UID_ROOT + ".") for g in groups)


@pytest.mark.parametrize(("modality", "finding"), [("CR", True), ("DX", False)])
def test_demo_classifier_sr_on_a_radiograph_is_valid(
    tmp_path: Path, modality: str, finding: bool
) -> None:
    card = read_card(DEMO_CLASSIFIER)
    image = make_radiograph(np.random.default_rng(7), finding)
    source = radiograph_dataset(image, patient_id=f"VALID-{modality}", modality=modality)
    output = run_model(RunnerCache({}, "cpu"), card, [source])
    assert output.mask is None and output.classifications
    seg_path, sr_path, result, _ = _emit(
        [source], None, card.algorithm(UID_ROOT), [], tmp_path, output.classifications
    )
    assert seg_path is None
    content = _assert_sr_valid(sr_path, result)
    groups = content.get_image_measurement_groups()
    assert len(groups) == len(output.classifications)
    for group, classification in zip(groups, output.classifications, strict=True):
        (probability,) = group.get_measurements(
            name=hd.sr.CodedConcept("122157", "DCM", "Probability")
        )
        assert float(probability.value) == pytest.approx(classification.probability)


# --- a real CR (Agfa, MONOCHROME1) without type 2 attributes, and MONOCHROME1 inversion -------

#: Type 2 attributes of the Patient, General Study and General Series modules (Laterality and
#: Patient Position are 2C in General Series).
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


def _real_cr() -> Dataset:
    """A real computed radiograph: Agfa, MONOCHROME1, 12 bits, rescaled (pydicom test file)."""
    path = get_testdata_file("dicomdirtests/77654033/CR1/6154", download=False)
    assert isinstance(path, str), "pydicom's CR test file is missing"
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def classifier() -> RunnerCache:
    return RunnerCache({}, "cpu")


@pytest.mark.parametrize("keyword", TYPE2_OF_SOURCES)
def test_classifier_sr_on_a_real_cr_without_a_type_2_attribute_is_valid(
    tmp_path: Path, keyword: str, classifier: RunnerCache
) -> None:
    card = read_card(DEMO_CLASSIFIER)
    source = _real_cr()
    if keyword in source:
        del source[keyword]
    output = run_model(classifier, card, [source])
    assert output.classifications
    seg_path, sr_path, result, _ = _emit(
        [source], None, card.algorithm(UID_ROOT), [], tmp_path, output.classifications
    )
    assert seg_path is None
    _assert_sr_valid(sr_path, result)
    sr = pydicom.dcmread(sr_path)
    if keyword in TYPE2_COPIED:
        assert keyword in sr and sr[keyword].is_empty
    assert keyword not in source  # the source was not patched


def test_monochrome1_and_monochrome2_encodings_of_one_radiograph_classify_alike(
    classifier: RunnerCache,
) -> None:
    """MONOCHROME1 stores the image inverted; the classifier must see the same picture."""
    card = read_card(DEMO_CLASSIFIER)
    real = _real_cr()
    assert real.PhotometricInterpretation == "MONOCHROME1"
    as_monochrome2 = _real_cr()
    as_monochrome2.PhotometricInterpretation = "MONOCHROME2"
    stored = real.pixel_array.astype(np.int32)
    as_monochrome2.PixelData = (2**real.BitsStored - 1 - stored).astype(np.uint16).tobytes()
    image = make_radiograph(np.random.default_rng(11), True)
    pairs = [
        (real, as_monochrome2),
        tuple(
            radiograph_dataset(image, patient_id="MONO", monochrome1=inverted)
            for inverted in (True, False)
        ),
    ]
    for one, two in pairs:
        p1 = run_model(classifier, card, [one]).classifications
        p2 = run_model(classifier, card, [two]).classifications
        assert [c.probability for c in p1] == pytest.approx([c.probability for c in p2], abs=1e-6)
    synthetic = run_model(classifier, card, [pairs[1][0]]).classifications
    assert synthetic[0].flag  # the opacity is found in the MONOCHROME1 encoding


# --- a multi-frame source: the real CT as one enhanced CT image ------------------------------


@pytest.fixture(scope="module")
def enhanced_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, list[Dataset]]:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"real CT test data missing at {REAL_CT_DIR}")
    folder = tmp_path_factory.mktemp("enhanced")
    multi = pydicom.dcmread(enhanced_real_ct(folder))
    slices = [pydicom.dcmread(p) for p in repair_real_ct(REAL_CT_DIR, folder / "slices")]
    return multi, slices


def test_demo_bundle_objects_on_an_enhanced_ct_reference_its_frames_and_are_valid(
    tmp_path: Path, enhanced_ct: tuple[Dataset, list[Dataset]]
) -> None:
    multi, _ = enhanced_ct
    assert multi.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT
    card = read_card(DEMO_BUNDLE)
    output = run_model(RunnerCache({}, "cpu"), card, [multi])
    assert output.mask is not None and output.mask.shape == (int(multi.NumberOfFrames), 512, 512)
    assert output.mask.any()
    seg_path, sr_path, result, kept = _emit(
        [multi], output.mask, card.algorithm(UID_ROOT), card.segments, tmp_path
    )
    assert seg_path is not None and kept is not None
    np.testing.assert_array_equal(kept, output.mask)  # run_model measured it the same way
    assert dciodvfy_errors(seg_path)[0] == []
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(multi.SOPInstanceUID),
        source_frame_numbers=list(range(1, int(multi.NumberOfFrames) + 1)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels > 0, output.mask > 0)
    content = _assert_sr_valid(sr_path, result)
    (group,) = content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
    assert float(volume.value) == pytest.approx(result.segments[0].volume_mm3)


def test_labels_land_on_the_frames_of_an_enhanced_ct_as_on_its_single_frame_slices(
    enhanced_ct: tuple[Dataset, list[Dataset]],
) -> None:
    """The same prediction sampled on the enhanced CT's frames and on the original slices."""
    multi, slices = enhanced_ct
    plan = plan_volume(slices)
    labels = (np.indices(plan.shape).sum(axis=0) % 5).astype(np.int64)  # varies along x, y, z
    on_frames = labels_on_frames(labels, plan.affine, [multi])
    on_slices = labels_on_frames(labels, plan.affine, slices)
    at = {
        tuple(np.round([float(v) for v in ds.ImagePositionPatient], 3)): i
        for i, ds in enumerate(slices)
    }
    for f, plane in enumerate(plane_headers([multi])):
        twin = at[tuple(np.round([float(v) for v in plane.ImagePositionPatient], 3))]
        np.testing.assert_array_equal(on_frames[f], on_slices[twin])
    assert on_frames.any()
