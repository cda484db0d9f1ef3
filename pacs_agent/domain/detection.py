"""When a segment of a model's output is a finding: the model card's volume thresholds.

A segmentation model labels voxels; a few stray voxels must not flag a study. The model card
gives each segment (or all of them, in ``[detection]``) two thresholds in mm3 and a
connectivity:

* connected components (the segment's voxels joined through faces, edges and corners:
  ``connectivity`` 6, 18 or 26 neighbours) smaller than ``min_component_mm3`` are *dropped*:
  they count nowhere and are left out of the Segmentation;
* the segment is *detected* when what is kept has at least one voxel and at least
  ``min_volume_mm3`` of volume.

Thresholds are volumes, not voxel counts, so that one card means the same on a 0.5 mm and a
5 mm reconstruction (decision record 0011-segment-detection-thresholds).

Pure functions: component sizes (voxel counts) and the voxel volume in, a decision out. The
components themselves are found by :func:`pacs_agent.dicom.geometry.measure_segments`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The neighbourhoods that join two voxels of a segment into one component: 6 (faces),
#: 18 (faces and edges), 26 (faces, edges and corners).
CONNECTIVITIES = (6, 18, 26)

#: Relative slack of a volume comparison: a threshold typed as N voxels x the voxel volume
#: must not be missed by a rounding error of the product.
_RELATIVE_TOLERANCE = 1e-9


def reaches(volume_mm3: float, threshold_mm3: float) -> bool:
    """``volume_mm3 >= threshold_mm3``, forgiving a floating-point rounding error."""
    return volume_mm3 >= threshold_mm3 * (1.0 - _RELATIVE_TOLERANCE)


@dataclass(frozen=True)
class DetectionCriteria:
    """The thresholds of one segment (see the module docstring).

    The defaults keep every voxel and detect a segment with any voxel: what a model card
    without thresholds did before they existed.
    """

    min_volume_mm3: float = 0.0
    min_component_mm3: float = 0.0
    connectivity: int = 26

    def __post_init__(self) -> None:
        if self.min_volume_mm3 < 0 or self.min_component_mm3 < 0:
            raise ValueError("volume thresholds must not be negative")
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"connectivity must be one of {CONNECTIVITIES}")


@dataclass(frozen=True)
class ComponentSelection:
    """Which connected components of one segment are kept.

    ``kept`` holds the positions (in the sizes given to :func:`select_components`) of the
    components kept, largest first.
    """

    kept: tuple[int, ...]
    kept_voxels: int
    dropped_voxels: int
    largest_voxels: int

    @property
    def component_count(self) -> int:
        return len(self.kept)

    @property
    def dropped(self) -> bool:
        return self.dropped_voxels > 0


def select_components(
    sizes: Sequence[int], voxel_volume_mm3: float, criteria: DetectionCriteria
) -> ComponentSelection:
    """Keep the components (``sizes``: voxel counts) of at least ``min_component_mm3``.

    Raises ValueError for a non-positive voxel volume or a negative size.
    """
    if voxel_volume_mm3 <= 0:
        raise ValueError("the voxel volume must be positive")
    if any(size < 0 for size in sizes):
        raise ValueError("component sizes must not be negative")
    kept = sorted(
        (
            index
            for index, size in enumerate(sizes)
            if size > 0 and reaches(size * voxel_volume_mm3, criteria.min_component_mm3)
        ),
        key=lambda index: (-sizes[index], index),
    )
    kept_voxels = sum(int(sizes[index]) for index in kept)
    return ComponentSelection(
        kept=tuple(kept),
        kept_voxels=kept_voxels,
        dropped_voxels=sum(int(size) for size in sizes) - kept_voxels,
        largest_voxels=int(sizes[kept[0]]) if kept else 0,
    )


def is_detected(voxel_count: int, volume_mm3: float, criteria: DetectionCriteria) -> bool:
    """A segment whose kept voxels number ``voxel_count`` (``volume_mm3`` in all) is detected
    when it has a voxel and reaches the card's ``min_volume_mm3``."""
    return voxel_count > 0 and reaches(volume_mm3, criteria.min_volume_mm3)
