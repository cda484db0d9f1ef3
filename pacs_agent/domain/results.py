"""The result model, in DICOM's own words.

These are plain values passed from the model runtime (workers/) to the DICOM builders
(``pacs_agent.dicom``) and the database. They carry no numpy arrays and no torch objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pacs_agent.domain.detection import DetectionCriteria, is_detected


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a Segmentation, as the model card codes it.

    ``number`` is the Segment Number in the SEG and also the label value in the model's
    discrete output (channel index after argmax). ``detection`` says when its voxels are a
    finding (volume thresholds, minimum component size; see ``pacs_agent.domain.detection``).
    """

    number: int
    label: str
    category: CodedConcept
    type: CodedConcept
    detection: DetectionCriteria = field(default_factory=DetectionCriteria)


@dataclass(frozen=True)
class AlgorithmSpec:
    """Algorithm identification (TID 4019) and the IHE AIR Contributing Equipment."""

    name: str
    version: str
    #: Device Observer UID / Device UID: derived from name and version, so it changes
    #: whenever the model changes.
    device_uid: str
    manufacturer: str = "pacs-agent"
    clinical_use: bool = False


@dataclass(frozen=True)
class SegmentResult:
    """What a segmentation model found for one segment.

    Voxel count, volume and mean HU are those of the *kept* voxels: the connected components
    of at least the card's ``min_component_mm3`` (``component_count`` of them, the largest
    ``largest_component_mm3``; None when components were not measured).
    """

    segment: SegmentSpec
    voxel_count: int
    volume_mm3: float
    mean_hu: float | None = None
    component_count: int | None = None
    largest_component_mm3: float | None = None

    @property
    def detected(self) -> bool:
        """Kept voxels that reach the card's ``min_volume_mm3`` (any voxel by default)."""
        return is_detected(self.voxel_count, self.volume_mm3, self.segment.detection)


@dataclass(frozen=True)
class ClassificationResult:
    """What a classification model said about one coded finding."""

    finding: CodedConcept
    label: str
    probability: float
    #: The model card's threshold for this finding; ``flag`` is ``probability >= threshold``.
    threshold: float

    @property
    def flag(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ResultUIDs:
    """Deterministic UIDs of the objects one job emits (see ``pacs_agent.domain.uids``)."""

    seg_series_uid: str
    seg_sop_uid: str
    sr_series_uid: str
    sr_sop_uid: str


@dataclass(frozen=True)
class JobResult:
    """Everything the DICOM builders need besides the source datasets and the mask."""

    algorithm: AlgorithmSpec
    segments: tuple[SegmentResult, ...]
    uids: ResultUIDs
    classifications: tuple[ClassificationResult, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    #: What was done to the input before the model saw it (e.g. gantry tilt resampled);
    #: recorded as TID 4019 Algorithm Parameters in the SR.
    processing_notes: tuple[str, ...] = ()
