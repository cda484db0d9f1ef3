"""The failure notice: a Comprehensive 3D SR telling the PACS that the AI could not process a
series, and why, built by highdicom.

Sent when a job fails for good, so that a reader does not wait for a result that will never
come. Content tree (root CONTAINER "Diagnostic Imaging Report", LN 18748-4):

- observation context: the model as a device observer (TID 1004: Device Observer UID = the
  model's device UID, name, manufacturer, model name), as in the measurement report;
- HAS CONCEPT MOD "Procedure reported" (DCM 121058): the study's procedure, as in the
  measurement report;
- CONTAINS TEXT "Comment" (DCM 121106): "AI processing not performed: ..." with the model, the
  series and the reason the job failed.

It references the source instances as evidence, carries the patient and study of the source
(type 2 attributes it lacks written empty; nothing else from it) and marks the document
complete but unverified. SOP and Series Instance UIDs are derived from the job
(``pacs_agent.domain.uids.failure_notice_uids``), so another failure of the same job replaces
it in the PACS.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_agent.dicom.seg import (
    SEG_SERIES_NUMBER,
)
from pacs_agent.dicom.sources import builder_sources, no_patient_names_in_warnings
from pacs_agent.dicom.sr import ai_sr_attributes, procedure_reported
from pacs_agent.domain.results import AlgorithmSpec

__all__ = ["NOTICE_SERIES_NUMBER", "build_failure_notice", "failure_text"]

#: Series Number of failure notices (after the SEG's and the SR's).
NOTICE_SERIES_NUMBER = SEG_SERIES_NUMBER + 2
#: Longest reason kept in the notice (the job keeps the whole reason).
_REASON_MAX = 1024


def failure_text(algorithm: AlgorithmSpec, source: Dataset, reason: str) -> str:
    """The sentence a reader sees: which model, which series, why, and that no result follows."""
    series = str(source.get("SeriesDescription") or "").strip()
    number = source.get("SeriesNumber")
    which = " ".join(
        part
        for part in (f"series {number}" if number is not None else "the series", series)
        if part
    )
    reason = " ".join(reason.split())
    if len(reason) > _REASON_MAX:
        reason = reason[: _REASON_MAX - 3] + "..."
    return (
        f"AI processing not performed: the model {algorithm.name} {algorithm.version} could not "
        f"process {which} (Series Instance UID {source.get('SeriesInstanceUID', '?')}). "
        f"Reason: {reason} No AI result will follow for this series unless it is reprocessed."
    )


@no_patient_names_in_warnings()
def build_failure_notice(
    source_datasets: Sequence[Dataset],
    algorithm: AlgorithmSpec,
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = NOTICE_SERIES_NUMBER,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR stating that ``algorithm`` could not process the series of
    ``source_datasets`` (headers suffice) because of ``reason``. Type 2 patient and study
    attributes the sources lack are written empty, as in the measurement report.

    Raises ValueError when there are no sources or they span several series.
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    series_uids = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if len(series_uids) != 1:
        raise ValueError(f"source instances span {len(series_uids)} series; one expected")
    source = source_datasets[0]
    text = failure_text(algorithm, source, reason)

    root = hd.sr.ContainerContentItem(
        name=codes.LN.DiagnosticImagingReport, template_id=None, is_content_continuous=False
    )
    items: list[hd.sr.ContentItem] = [
        item
        for item in _observation_context_items(algorithm)
        if isinstance(item, hd.sr.ContentItem)
    ]
    items.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=procedure_reported(source),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    root.ContentSequence = hd.sr.ContentSequence(items)
    non_ascii = not all(t.isascii() for t in (text, algorithm.name, algorithm.manufacturer))
    charset = source.get("SpecificCharacterSet")
    return hd.sr.Comprehensive3DSR(
        evidence=builder_sources(source_datasets),
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **ai_sr_attributes(algorithm, "NOT PROCESSED"),
        specific_character_set="ISO_IR 192" if non_ascii else (charset or None),
    )


def _observation_context_items(algorithm: AlgorithmSpec) -> hd.sr.ObservationContext:
    """The model as device observer (TID 1001/1004), as the measurement report names it."""
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
