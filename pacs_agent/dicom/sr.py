"""TID 1500 Measurement Report (Comprehensive 3D SR) of a segmentation job, built by highdicom.

Content tree:

- observation context: the model as a device observer (TID 1004: Device Observer UID = the
  model's device UID, name, manufacturer, model name);
- procedure reported: the study's Procedure Code Sequence, else "<modality> unspecified body
  region" (CID 100), else "Imaging procedure";
- for each detected segment a TID 1411 Volumetric ROI group: tracking identifier (the same
  Tracking UID as the SEG segment), Referenced Segment (the SEG instance and segment number,
  and the source series), finding category and type from the model card, qualitative
  evaluation "<type> = Present" (CID 240), Volume in mm3 and, for CT, the mean Attenuation
  Coefficient in Hounsfield units (both of the kept voxels: the model card drops connected
  components below its minimum size), the number of connected components kept and the volume
  of the largest (private codes, :data:`COMPONENT_COUNT` and :data:`LARGEST_COMPONENT_VOLUME`:
  DICOM defines none), each with the algorithm identification (TID 4019);
- for each segment not detected a TID 1501 group with the same tracking identifier, finding
  category and type, and the qualitative evaluation "<type> = Absent" (CID 240:
  SCT 272519000);
- for each classification output a TID 1501 group on the source images: tracking identifier,
  finding type = the coded finding, the qualitative evaluation "<finding> = Present" when the
  probability reaches the model card's threshold and "Absent" below it, and the measurement
  "Probability" (DCM 122157, unit "no units" {1}) with the algorithm identification.

The algorithm identification carries ``result.processing_notes`` as TID 4019 Algorithm
Parameters (e.g. that a gantry-tilted input was resampled onto an orthogonal grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_agent.dicom.seg import (
    SEG_SERIES_NUMBER,
    ai_series_description,
    algorithm_equipment,
    character_set,
    classification_tracking_uid,
    coded,
    fit_long_string,
    segment_numbers_by_tracking_uid,
    segment_tracking_uid,
)
from pacs_agent.dicom.sources import builder_sources, no_patient_names_in_warnings
from pacs_agent.domain.results import AlgorithmSpec, JobResult, SegmentResult

#: Default Series Number of the SR series.
SR_SERIES_NUMBER = SEG_SERIES_NUMBER + 1

#: pacs-agent's private coding scheme (PS3.3 8.2: private designators begin with "99"), for
#: the measurements PS3.16 has no code for; identified in the SR's Coding Scheme Identification
#: Sequence whenever the SR uses it, and listed in docs/conformance.md.
PRIVATE_SCHEME = "99PACSAGENT"
#: Number of connected components of a segment that count (unit: no units, UCUM "1").
COMPONENT_COUNT = CodedConcept(
    value="NCOMPONENTS", scheme_designator=PRIVATE_SCHEME, meaning="Connected component count"
)
#: Volume of the largest connected component of a segment (unit: mm3).
LARGEST_COMPONENT_VOLUME = CodedConcept(
    value="LARGESTCOMPVOL",
    scheme_designator=PRIVATE_SCHEME,
    meaning="Largest connected component volume",
)

#: Procedure reported when the study carries no Procedure Code Sequence (CID 100).
_PROCEDURE_BY_MODALITY = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}


def procedure_reported(source: Dataset) -> CodedConcept:
    """The imaging procedure the report describes (TID 1500 "Procedure reported").

    The first usable item of the source's Procedure Code Sequence; otherwise the CID 100
    "<modality> unspecified body region" code; otherwise SCT 363679005 "Imaging procedure".
    """
    for item in source.get("ProcedureCodeSequence", []):
        if item.get("CodeValue") and item.get("CodingSchemeDesignator") and item.get("CodeMeaning"):
            return CodedConcept(
                value=str(item.CodeValue),
                scheme_designator=str(item.CodingSchemeDesignator),
                meaning=str(item.CodeMeaning),
            )
    code = _PROCEDURE_BY_MODALITY.get(
        str(source.get("Modality", "")), codes.cid100.ImagingProcedure
    )
    return CodedConcept.from_code(code)


def _observation_context(result: JobResult) -> hd.sr.ObservationContext:
    algorithm = result.algorithm
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.device_uid,
        name=f"{algorithm.name} {algorithm.version}",
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm_id(result: JobResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.algorithm.name,
        version=result.algorithm.version,
        parameters=list(result.processing_notes) or None,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=result.algorithm.manufacturer,
    )


def _tracking(result: JobResult, segment: SegmentResult) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=segment_tracking_uid(result, segment.segment),
        identifier=fit_long_string(segment.segment.label),
    )


def _detected_group(
    result: JobResult, segment: SegmentResult, seg: Dataset, segment_number: int, series_uid: str
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    spec = segment.segment
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=segment.volume_mm3,
            unit=codes.UCUM.CubicMillimeter,
            algorithm_id=_algorithm_id(result),
        )
    ]
    if segment.mean_hu is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.AttenuationCoefficient,
                value=segment.mean_hu,
                unit=codes.UCUM.HounsfieldUnit,
                derivation=codes.SCT.Mean,
                algorithm_id=_algorithm_id(result),
            )
        )
    if segment.component_count is not None:
        measurements.append(
            hd.sr.Measurement(
                name=COMPONENT_COUNT,
                value=segment.component_count,
                unit=codes.UCUM.NoUnits,
                algorithm_id=_algorithm_id(result),
            )
        )
    if segment.largest_component_mm3 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=LARGEST_COMPONENT_VOLUME,
                value=segment.largest_component_mm3,
                unit=codes.UCUM.CubicMillimeter,
                algorithm_id=_algorithm_id(result),
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, segment),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        ),
        finding_category=coded(spec.category),
        finding_type=coded(spec.type),
        algorithm_id=_algorithm_id(result),
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(spec.type), value=codes.cid240.Present)
        ],
    )


def _absent_group(
    result: JobResult, segment: SegmentResult
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    spec = segment.segment
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, segment),
        finding_category=coded(spec.category),
        finding_type=coded(spec.type),
        algorithm_id=_algorithm_id(result),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(spec.type), value=codes.cid240.Absent)
        ],
    )


def _classification_group(
    result: JobResult, index: int, source_datasets: Sequence[Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    classification = result.classifications[index]
    finding = coded(classification.finding)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=classification_tracking_uid(result, index),
            identifier=fit_long_string(classification.label),
        ),
        finding_type=finding,
        algorithm_id=_algorithm_id(result),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in source_datasets
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=classification.probability,
                unit=codes.UCUM.NoUnits,
                algorithm_id=_algorithm_id(result),
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=finding,
                value=codes.cid240.Present if classification.flag else codes.cid240.Absent,
            )
        ],
    )


@no_patient_names_in_warnings()
def build_measurement_report(
    source_datasets: Sequence[Dataset],
    seg: Dataset | None,
    result: JobResult,
    *,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of ``result`` on ``source_datasets`` and ``seg``.

    ``seg`` is the Segmentation built by :func:`pacs_agent.dicom.seg.build_segmentation` for
    the same result (None when nothing was detected); its segments are found by Tracking UID.
    Evidence: the source instances and the SEG. The report is complete, preliminary and
    unverified (nobody has reviewed it). Patient and study come from the sources (type 2
    attributes they lack are written empty; the sources are not modified); SOP and Series
    Instance UIDs from ``result.uids``.

    Segments (``result.segments``) and classification outputs (``result.classifications``)
    each get their measurement group, so one report serves a segmentation job, a
    classification job, or a model that does both.

    Raises ValueError when there are no sources, they span several series, the SEG belongs to
    another study, a detected segment has no segment in ``seg``, or there is nothing to
    report (no segments and no classifications).
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    source = source_datasets[0]
    series_uids = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if len(series_uids) != 1:
        raise ValueError(f"source instances span {len(series_uids)} series; one expected")
    (series_uid,) = series_uids
    if seg is not None and str(seg.StudyInstanceUID) != str(source.StudyInstanceUID):
        raise ValueError("the Segmentation belongs to another study than the source instances")

    numbers = segment_numbers_by_tracking_uid(seg) if seg is not None else {}
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for segment in result.segments:
        if not segment.detected:
            groups.append(_absent_group(result, segment))
            continue
        number = numbers.get(segment_tracking_uid(result, segment.segment))
        if seg is None or number is None:
            raise ValueError(
                f"segment {segment.segment.number} ({segment.segment.label}) was detected "
                "but the Segmentation has no segment for it"
            )
        groups.append(_detected_group(result, segment, seg, number, series_uid))
    for index in range(len(result.classifications)):
        groups.append(_classification_group(result, index, source_datasets))
    if not groups:
        raise ValueError("the result has neither segments nor classifications to report")

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=procedure_reported(source),
        imaging_measurements=groups,
    )
    algorithm = result.algorithm
    evidence = [*builder_sources(source_datasets), *([seg] if seg is not None else [])]
    private = any(
        s.detected and (s.component_count is not None or s.largest_component_mm3 is not None)
        for s in result.segments
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=result.uids.sr_series_uid,
        series_number=series_number,
        sop_instance_uid=result.uids.sr_sop_uid,
        instance_number=instance_number,
        **ai_sr_attributes(algorithm, "SR"),
        specific_character_set=character_set(source, result),
        coding_schemes=[_private_scheme()] if private else None,
    )


def ai_sr_attributes(algorithm: AlgorithmSpec, kind: str) -> dict[str, Any]:
    """What every SR pacs-agent writes says of itself: the algorithm as manufacturer, model and
    device (IHE AIR's Contributing Equipment), completion and verification flags (an AI result
    is complete, neither final nor verified) and the series description for ``kind``."""
    return {
        "manufacturer": fit_long_string(algorithm.manufacturer),
        "is_complete": True,
        "is_final": False,
        "is_verified": False,
        "contributing_equipment": [algorithm_equipment(algorithm)],
        "series_description": ai_series_description(kind, algorithm),
        "manufacturer_model_name": fit_long_string(algorithm.name),
        "software_versions": fit_long_string(algorithm.version),
        "device_serial_number": algorithm.device_uid,
    }


def _private_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="pacs-agent private codes",
        version="1",
        responsible_organization="pacs-agent",
    )
