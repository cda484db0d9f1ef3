"""DICOM Segmentation (SEG) of a model's label map, built by highdicom.

One binary segment per detected ``SegmentSpec`` (and per empty one too when asked), with the
coded category and type of the model card, the algorithm identification of the model and the
IHE AI Results Contributing Equipment item that names the model, its version and device UID.
UIDs come from ``JobResult.uids`` so that a re-run replaces the object in the PACS.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_agent.dicom.geometry import (
    check_labels,
    check_mask,
    has_plane_geometry,
    is_multi_frame,
    label_counts,
    plane_headers,
    slice_order,
)
from pacs_agent.dicom.sources import builder_sources, no_patient_names_in_warnings
from pacs_agent.domain.results import AlgorithmSpec, JobResult, SegmentSpec
from pacs_agent.domain.results import CodedConcept as DomainCode
from pacs_agent.domain.uids import DEFAULT_UID_ROOT, derive_uid, validate_uid_root

#: Default Series Number of the SEG series (the SR uses the next one).
SEG_SERIES_NUMBER = 9001
#: Longest value of a LO (Long String) element.
_LO_MAX = 64


def coded(concept: DomainCode) -> CodedConcept:
    """The highdicom CodedConcept of a domain CodedConcept."""
    return CodedConcept(
        value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning
    )


def fit_long_string(text: str, limit: int = _LO_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def ai_series_description(kind: str, algorithm: AlgorithmSpec) -> str:
    """Series Description that marks an AI result, e.g. ``AI SEG: spleen 0.5.1 (not for
    clinical use)``; the model name is shortened to keep the value within 64 characters."""
    suffix = "" if algorithm.clinical_use else " (not for clinical use)"
    head = f"AI {kind}: "
    room = _LO_MAX - len(head) - len(suffix)
    model = f"{algorithm.name} {algorithm.version}"
    return head + fit_long_string(model, room) + suffix


def algorithm_equipment(algorithm: AlgorithmSpec) -> hd.ContributingEquipment:
    """IHE AIR Contributing Equipment item of the model: manufacturer, model name, version
    and the Device UID that changes whenever the model does (Processing Equipment)."""
    item = hd.ContributingEquipment(
        manufacturer=fit_long_string(algorithm.manufacturer),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=fit_long_string(algorithm.name),
        software_versions=fit_long_string(algorithm.version),
        contribution_description=fit_long_string(
            f"AI model {algorithm.name} {algorithm.version} produced this result", 1024
        ),
    )
    item.DeviceUID = algorithm.device_uid
    return item


def _result_texts(result: JobResult) -> list[str]:
    algorithm = result.algorithm
    texts = [algorithm.name, algorithm.version, algorithm.manufacturer]
    for segment in result.segments:
        spec = segment.segment
        texts += [spec.label, spec.category.meaning, spec.type.meaning]
    for classification in result.classifications:
        texts += [classification.label, classification.finding.meaning]
    return texts


def character_set(source: Dataset, result: JobResult) -> str | list[str] | None:
    """Specific Character Set of a result object.

    UTF-8 (``ISO_IR 192``) when a text the result adds (model, labels, code meanings) is not
    ASCII: the copied patient and study values, already decoded, re-encode in it whatever the
    source's set. Otherwise the source's own set (the PACS already shows that patient in it),
    or none (the default repertoire) when the source has none or an empty value, as some
    anonymisers leave.
    """
    if not all(text.isascii() for text in _result_texts(result)):
        return "ISO_IR 192"
    value = source.get("SpecificCharacterSet")
    if not value:
        return None
    return value if isinstance(value, str) else [str(v) for v in value]


def uid_root_of(uid: str) -> str:
    """The root a UID made by :func:`pacs_agent.domain.uids.derive_uid` was derived from
    (everything before its last component); the ``2.25`` root when that is no usable root."""
    root = uid.rsplit(".", 1)[0]
    try:
        return validate_uid_root(root)
    except ValueError:
        return DEFAULT_UID_ROOT


def segment_tracking_uid(result: JobResult, spec: SegmentSpec) -> str:
    """Tracking UID of a segment's finding, shared by the SEG and the SR (deterministic).

    Under the configured UID root, read from the job's SEG Series Instance UID (the result
    carries its UIDs, not the settings)."""
    series_uid = result.uids.seg_series_uid
    return derive_uid(uid_root_of(series_uid), series_uid, "tracking", str(spec.number))


def classification_tracking_uid(result: JobResult, index: int) -> str:
    """Tracking UID of the ``index``-th classification finding of a job (deterministic, under
    the configured UID root read from the SR Series Instance UID)."""
    series_uid = result.uids.sr_series_uid
    finding = result.classifications[index].finding
    return derive_uid(
        uid_root_of(series_uid),
        series_uid,
        "classification",
        str(index),
        finding.scheme,
        finding.value,
    )


def segment_numbers_by_tracking_uid(seg: Dataset) -> dict[str, int]:
    """Segment Number of each segment of a SEG, keyed by its Tracking UID."""
    numbers: dict[str, int] = {}
    for item in seg.get("SegmentSequence", []):
        uid = item.get("TrackingUID")
        if uid:
            numbers[str(uid)] = int(item.SegmentNumber)
    return numbers


@no_patient_names_in_warnings()
def build_segmentation(
    source_datasets: Sequence[Dataset],
    mask: np.ndarray,
    result: JobResult,
    *,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    include_empty: bool = False,
) -> hd.seg.Segmentation | None:
    """A binary SEG of ``mask`` on ``source_datasets``, or None when nothing was detected.

    ``mask`` is a (frames, rows, cols) label map with ``mask[i]`` on ``source_datasets[i]``
    (any order: the sources are put in slice order first, so the object does not depend on
    it). The source may also be one multi-frame image (enhanced CT/MR, one file): then
    ``mask[i]`` is on its frame ``i + 1`` and the SEG's frames reference those source frames.
    Segments are those of
    ``result.segments`` that have voxels in the mask, numbered 1.. in that order; with
    ``include_empty`` the empty ones are kept too. Frames without any segment are omitted.
    Patient and study come from the sources; SOP and Series Instance UIDs from
    ``result.uids``; the General Equipment names the model (Manufacturer, Manufacturer's Model
    Name = model name, Software Versions = model version, Device Serial Number = device UID).
    Headers without pixel data are enough as sources.

    ``mask`` must be what the result measured: the label map
    :func:`pacs_agent.dicom.geometry.measure_segments` returns (without the components the
    model card drops and the segments it does not detect).

    Type 2 patient and study attributes the sources lack are written empty
    (:func:`pacs_agent.dicom.sources.builder_sources`); the sources are not modified.

    Raises ValueError when the mask does not fit the sources, holds labels that
    ``result.segments`` does not describe, disagrees with ``result`` about which segments
    were detected or how many voxels a detected one has, the sources are not one stack of
    parallel slices, or they mix a multi-frame image with other instances (a SEG references
    one multi-frame image or single-frame instances).
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    multi_frame = [ds for ds in source_datasets if is_multi_frame(ds)]
    if multi_frame and len(source_datasets) > 1:
        raise ValueError(
            f"the series has {len(source_datasets)} instances, {len(multi_frame)} of them "
            "multi-frame: a Segmentation references one multi-frame image or single-frame "
            "instances"
        )
    mask = np.asarray(mask)
    check_mask(mask, plane_headers(source_datasets))
    specs = [segment.segment for segment in result.segments]
    counts = label_counts(mask)
    check_labels(counts, specs)

    present = {
        spec.number: bool(spec.number < len(counts) and counts[spec.number] > 0) for spec in specs
    }
    for segment in result.segments:
        number = segment.segment.number
        if present[number] != segment.detected:
            raise ValueError(
                f"segment {number} ({segment.segment.label}): the mask and the "
                f"result disagree on whether it was detected"
            )
        if segment.detected and int(counts[number]) != segment.voxel_count:
            raise ValueError(
                f"segment {number} ({segment.segment.label}): the mask has "
                f"{int(counts[number])} voxels, the result counts {segment.voxel_count} "
                "(build the SEG from the mask measure_segments returns)"
            )
    included = [spec for spec in specs if present[spec.number] or include_empty]
    if not any(present.values()) and not include_empty:
        return None
    if not included:
        raise ValueError("result.segments is empty: nothing to put in a Segmentation")

    order = (
        slice_order(source_datasets)
        if len(source_datasets) > 1 and has_plane_geometry(source_datasets)
        else list(range(len(mask)))
    )
    sources = builder_sources(
        source_datasets if multi_frame else [source_datasets[i] for i in order]
    )
    # Relabel to the SEG's segment numbers 1..n (0 for segments left out): highdicom takes a
    # label map and splits it per segment frame by frame, so no (frames, rows, cols, segments)
    # array is ever made.
    dtype = np.uint8 if len(included) < 256 else np.uint16
    relabel = np.zeros(max(len(counts), max(spec.number for spec in specs) + 1), dtype=dtype)
    for number, spec in enumerate(included, start=1):
        relabel[spec.number] = number
    ordered = mask[order]
    labels = relabel[ordered.view(np.uint8) if ordered.dtype == np.bool_ else ordered]

    algorithm = result.algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=fit_long_string(algorithm.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=fit_long_string(algorithm.version),
        source=fit_long_string(algorithm.manufacturer),
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=fit_long_string(spec.label),
            segmented_property_category=coded(spec.category),
            segmented_property_type=coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=segment_tracking_uid(result, spec),
            tracking_id=fit_long_string(spec.label),
        )
        for number, spec in enumerate(included, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=result.uids.seg_series_uid,
        series_number=series_number,
        sop_instance_uid=result.uids.seg_sop_uid,
        instance_number=instance_number,
        manufacturer=fit_long_string(algorithm.manufacturer),
        manufacturer_model_name=fit_long_string(algorithm.name),
        software_versions=fit_long_string(algorithm.version),
        device_serial_number=algorithm.device_uid,
        content_description=fit_long_string(f"{algorithm.name} {algorithm.version}"),
        series_description=ai_series_description("SEG", algorithm),
        contributing_equipment=[algorithm_equipment(algorithm)],
        omit_empty_frames=any(present.values()),
        specific_character_set=character_set(sources[0], result),
    )
