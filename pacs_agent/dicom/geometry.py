"""Slice geometry and per-segment statistics of an image series.

Pure functions: datasets and arrays in, numbers out. The convention everywhere in
``pacs_agent.dicom`` is that ``mask[i]`` belongs to the ``i``-th image plane of the datasets:
``datasets[i]`` for single-frame instances (in the order the caller passes them), frame
``i + 1`` for one multi-frame image (enhanced CT/MR); see :func:`plane_headers`. A mask is a
*label map*: the voxels whose value is a segment's ``SegmentSpec.number`` belong to that
segment, 0 is background.

:func:`measure_segments` also finds each segment's connected components (scipy, the worker's
dependency, imported only when it runs) and applies the model card's thresholds
(``pacs_agent.domain.detection``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut

from pacs_agent.dicom.volume import _functional, _group_item, frames_of
from pacs_agent.domain.detection import ComponentSelection, select_components
from pacs_agent.domain.results import SegmentResult, SegmentSpec

#: Two slice spacings (or two pixel spacings) closer than this are the same, in mm.
SPACING_TOLERANCE_MM = 0.01
#: Two direction cosines closer than this are the same orientation.
ORIENTATION_TOLERANCE = 1e-4


def _floats(ds: Dataset, keyword: str, count: int) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise ValueError(
            f"instance {ds.get('SOPInstanceUID', '?')} has no usable {keyword} "
            f"({count} numbers expected)"
        )
    return np.asarray([float(v) for v in value], dtype=np.float64)


def slice_normal(ds: Dataset) -> npt.NDArray[np.float64]:
    """Unit normal of the image plane: row direction x column direction.

    Raises ValueError if ImageOrientationPatient is missing or degenerate.
    """
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise ValueError(
            f"instance {ds.get('SOPInstanceUID', '?')} has a degenerate ImageOrientationPatient"
        )
    return np.asarray(normal / norm, dtype=np.float64)


def is_multi_frame(ds: Dataset) -> bool:
    """True for a multi-frame image: several frames, or per-frame functional groups."""
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def plane_headers(datasets: Sequence[Dataset]) -> list[Dataset]:
    """One header per image plane of ``datasets``, in the order of
    :func:`pacs_agent.dicom.volume.frames_of` (the order of the ``mask`` convention).

    A single-frame instance is its own header (the same object). Each frame of a multi-frame
    image gets a header without pixel data that describes that frame the way a single-frame
    instance would: Rows, Columns, Modality, the instance's SOPInstanceUID, InstanceNumber =
    frame number, and the frame's ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness and RescaleSlope/RescaleIntercept from its per-frame or the shared
    functional groups (else the image's own attributes). Raises ValueError for a dataset that
    is not an image.
    """
    if not any(is_multi_frame(ds) for ds in datasets):
        return list(datasets)
    headers: list[Dataset] = []
    for frame in frames_of(datasets):
        ds = datasets[frame.dataset_index]
        if frame.frame_index is None:
            headers.append(ds)
            continue
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        item = (
            per_frame[frame.frame_index]
            if per_frame is not None and frame.frame_index < len(per_frame)
            else None
        )
        shared = _group_item(ds, "SharedFunctionalGroupsSequence")
        header = Dataset()
        header.Rows, header.Columns = frame.rows, frame.columns
        for keyword in ("Modality", "SOPClassUID", "SOPInstanceUID"):
            if keyword in ds:
                header[keyword] = ds[keyword]
        header.InstanceNumber = frame.frame_index + 1
        if frame.position is not None:
            header.ImagePositionPatient = list(frame.position)
        if frame.orientation is not None:
            header.ImageOrientationPatient = list(frame.orientation)
        spacing = _functional(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        spacing = spacing if spacing is not None else ds.get("PixelSpacing")
        if spacing is not None:
            header.PixelSpacing = list(spacing)
        thickness = _functional(item, shared, "PixelMeasuresSequence", "SliceThickness")
        thickness = thickness if thickness is not None else ds.get("SliceThickness")
        if thickness is not None:
            header.SliceThickness = thickness
        slope = frame.slope if frame.slope is not None else ds.get("RescaleSlope")
        intercept = frame.intercept if frame.intercept is not None else ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            header.RescaleSlope, header.RescaleIntercept = slope, intercept
        headers.append(header)
    return headers


def has_plane_geometry(datasets: Sequence[Dataset]) -> bool:
    """True when every dataset has ImagePositionPatient and ImageOrientationPatient."""
    return all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets)


def slice_order(datasets: Sequence[Dataset]) -> list[int]:
    """Indices of ``datasets`` in increasing position along the slice normal.

    The normal is that of the first dataset; ties (same position) keep InstanceNumber order.

    Raises ValueError when a dataset lacks ImagePositionPatient/ImageOrientationPatient or
    the datasets do not share one orientation (they are not one stack of parallel slices).
    """
    if not datasets:
        return []
    normal = slice_normal(datasets[0])
    reference = _floats(datasets[0], "ImageOrientationPatient", 6)
    keys: list[tuple[float, int, int]] = []
    for index, ds in enumerate(datasets):
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        if not np.allclose(orientation, reference, atol=ORIENTATION_TOLERANCE):
            raise ValueError(
                f"instance {ds.get('SOPInstanceUID', '?')} has another ImageOrientationPatient "
                "than the rest of the series: not one stack of parallel slices"
            )
        position = _floats(ds, "ImagePositionPatient", 3)
        instance_number = ds.get("InstanceNumber")
        keys.append(
            (
                float(np.dot(normal, position)),
                int(instance_number) if instance_number is not None else 0,
                index,
            )
        )
    return [index for _, _, index in sorted(keys)]


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets ordered along the slice normal (ImageOrientationPatient x ImagePositionPatient).

    Raises ValueError as :func:`slice_order` does.
    """
    return [datasets[i] for i in slice_order(datasets)]


def _pixel_area_mm2(datasets: Sequence[Dataset]) -> float:
    spacings = [_floats(ds, "PixelSpacing", 2) for ds in datasets]
    first = spacings[0]
    for ds, spacing in zip(datasets, spacings, strict=True):
        if not np.allclose(spacing, first, atol=SPACING_TOLERANCE_MM):
            raise ValueError(
                f"instance {ds.get('SOPInstanceUID', '?')} has another PixelSpacing "
                "than the rest of the series"
            )
    if first[0] <= 0 or first[1] <= 0:
        raise ValueError("PixelSpacing must be positive")
    return float(first[0] * first[1])


def slice_spacing_mm(datasets: Sequence[Dataset]) -> float:
    """Distance between consecutive slices along the normal (any input order).

    For a single slice, its SliceThickness. Raises ValueError when two slices share a
    position, when the spacing is not uniform (a gap or a mixed series: a voxel volume is
    then not one number), or when a single slice has no positive SliceThickness.
    """
    if not datasets:
        raise ValueError("no datasets")
    if len(datasets) == 1:
        thickness = datasets[0].get("SliceThickness")
        if thickness is None or float(thickness) <= 0:
            raise ValueError("a single slice needs a positive SliceThickness for a volume")
        return float(thickness)
    ordered = sort_slices(datasets)
    normal = slice_normal(ordered[0])
    positions = np.asarray(
        [float(np.dot(normal, _floats(ds, "ImagePositionPatient", 3))) for ds in ordered]
    )
    steps = np.diff(positions)
    if float(steps.min()) < SPACING_TOLERANCE_MM:
        raise ValueError("two slices share one position: not a single stack of slices")
    spacing = float(np.median(steps))
    if not np.allclose(steps, spacing, atol=SPACING_TOLERANCE_MM, rtol=1e-3):
        raise ValueError(
            f"slice spacing is not uniform (from {float(steps.min()):.3f} to "
            f"{float(steps.max()):.3f} mm): no single voxel volume"
        )
    return spacing


def voxel_volume_mm3(sorted_datasets: Sequence[Dataset]) -> float:
    """Volume of one voxel: PixelSpacing row x column x the spacing between slices.

    The spacing is measured between consecutive ImagePositionPatient values along the slice
    normal (not SliceThickness, which may differ from it); for a single slice it falls back to
    SliceThickness. The datasets may come in any order. Raises ValueError as
    :func:`slice_spacing_mm` does, or when PixelSpacing is missing or differs between slices.
    """
    if not sorted_datasets:
        raise ValueError("no datasets")
    return _pixel_area_mm2(sorted_datasets) * slice_spacing_mm(sorted_datasets)


def check_mask(mask: np.ndarray, datasets: Sequence[Dataset]) -> None:
    """Raise ValueError unless ``mask`` is a (frames, rows, cols) label map for ``datasets``."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be (frames, rows, columns); got shape {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        raise ValueError(f"mask must hold integer labels; got dtype {mask.dtype}")
    if mask.shape[0] != len(datasets):
        raise ValueError(f"mask has {mask.shape[0]} frames for {len(datasets)} source instances")
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != mask.shape[1:]:
            raise ValueError(
                f"mask frames are {mask.shape[1]}x{mask.shape[2]}, instance "
                f"{ds.get('SOPInstanceUID', '?')} is {ds.Rows}x{ds.Columns}"
            )
    if mask.dtype != np.bool_ and mask.size and int(mask.min()) < 0:
        raise ValueError("mask labels must not be negative")


def _frame_labels(frame: np.ndarray) -> np.ndarray:
    flat = np.ravel(frame)
    return flat.view(np.uint8) if flat.dtype == np.bool_ else flat


def label_counts(mask: np.ndarray) -> npt.NDArray[np.int64]:
    """Voxel count of every label value 0..max of a non-negative label map.

    Counts one frame at a time, so no temporary larger than a frame is made.
    """
    size = int(mask.max()) + 1 if mask.size else 1
    counts = np.zeros(size, dtype=np.int64)
    for frame in mask:
        counts += np.bincount(_frame_labels(frame), minlength=size)
    return counts


def check_labels(counts: npt.NDArray[np.int64], segments: Sequence[SegmentSpec]) -> None:
    """Raise ValueError for duplicate or non-positive segment numbers, or for labels present
    in the mask (``counts`` from :func:`label_counts`) that no segment describes."""
    numbers = [spec.number for spec in segments]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"segment numbers are not unique: {numbers}")
    if any(n < 1 for n in numbers):
        raise ValueError(f"segment numbers must be positive: {numbers}")
    present = {int(v) for v in np.flatnonzero(counts)} - {0}
    undescribed = sorted(present - set(numbers))
    if undescribed:
        raise ValueError(f"mask holds labels {undescribed} that no SegmentSpec describes")


@dataclass(frozen=True)
class MeasuredSegments:
    """The statistics of each segment and the label map a Segmentation of them carries.

    ``mask`` holds the kept components of the detected segments only (same shape, order and
    dtype as the model's label map): dropped components and segments not detected are 0, so
    the SEG shows exactly what the SR reports as present.
    """

    mask: np.ndarray
    segments: tuple[SegmentResult, ...]


def _structure(connectivity: int) -> npt.NDArray[np.bool_]:
    from scipy import ndimage  # the worker's dependency; the listener never measures

    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return np.asarray(ndimage.generate_binary_structure(3, rank), dtype=np.bool_)


def _keep_components(
    mask: np.ndarray,
    datasets: Sequence[Dataset],
    segments: Sequence[SegmentSpec],
    counts: npt.NDArray[np.int64],
    voxel_volume: float,
) -> tuple[np.ndarray, dict[int, ComponentSelection]]:
    """``mask`` without the components the card drops, and each segment's selection.

    Components are found in 3D on the slices in their order along the normal (neighbouring
    frames are neighbouring slices), one segment at a time inside its bounding box.
    """
    from scipy import ndimage

    none = ComponentSelection((), 0, 0, 0)
    present = [s for s in segments if s.number < len(counts) and counts[s.number] > 0]
    selections = {s.number: none for s in segments}
    if not present:
        return mask, selections
    order = slice_order(datasets) if len(datasets) > 1 else [0]
    volume = mask[order]  # a copy, in slice order
    labels_view = volume.view(np.uint8) if volume.dtype == np.bool_ else volume
    boxes = ndimage.find_objects(labels_view)
    dropped_any = False
    for spec in present:
        box = boxes[spec.number - 1]
        region = labels_view[box]
        components, n = ndimage.label(
            region == spec.number, structure=_structure(spec.detection.connectivity)
        )
        sizes = np.bincount(np.ravel(components), minlength=n + 1)[1:]
        selection = select_components([int(v) for v in sizes], voxel_volume, spec.detection)
        selections[spec.number] = selection
        if selection.dropped:
            keep = np.zeros(n + 1, dtype=np.bool_)
            keep[np.asarray(selection.kept, dtype=np.int64) + 1] = True
            region[(components > 0) & ~keep[components]] = 0
            dropped_any = True
    if not dropped_any:
        return mask, selections
    kept = np.empty_like(mask)
    kept[order] = volume
    return kept, selections


def _statistics(
    mask: np.ndarray,
    datasets: Sequence[Dataset],
    planes: Sequence[Dataset],
    segments: Sequence[SegmentSpec],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], bool]:
    """Voxel count and HU sum of every label value, and whether the series is CT.

    ``planes`` are the :func:`plane_headers` of ``datasets`` (``mask[i]`` on ``planes[i]``)."""
    counts = label_counts(mask)
    size = len(counts)
    sums = np.zeros(size, dtype=np.float64)
    is_ct = all(str(ds.get("Modality", "")) == "CT" for ds in datasets)
    if is_ct and any(s.number < size and counts[s.number] for s in segments):
        decoded: dict[int, np.ndarray] = {}
        frames = frames_of(datasets) if any(is_multi_frame(ds) for ds in datasets) else None
        for index, (plane, frame) in enumerate(zip(planes, mask, strict=True)):
            labels = _frame_labels(frame)
            if not labels.any():
                continue
            ds = datasets[frames[index].dataset_index] if frames is not None else plane
            if "PixelData" not in ds:
                raise ValueError(
                    f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data: "
                    "mean HU needs the full dataset"
                )
            if frames is None or frames[index].frame_index is None:
                stored = ds.pixel_array
            else:
                if id(ds) not in decoded:
                    decoded[id(ds)] = ds.pixel_array
                pixels = decoded[id(ds)]
                stored = pixels[frames[index].frame_index] if pixels.ndim == 3 else pixels
            hounsfield = np.asarray(apply_modality_lut(stored, plane), dtype=np.float64)
            sums += np.bincount(labels, weights=np.ravel(hounsfield), minlength=size)
    return counts, sums, is_ct


def measure_segments(
    mask: np.ndarray, datasets: Sequence[Dataset], segments: Sequence[SegmentSpec]
) -> MeasuredSegments:
    """Each segment's connected components, kept volume and mean HU, and the label map to
    put in the Segmentation.

    ``mask`` is a (frames, rows, cols) label map with ``mask[i]`` on the ``i``-th image plane
    of ``datasets`` (``datasets[i]``, or frame ``i + 1`` of one multi-frame image). Per
    segment (``segments`` order), its connected components (3D, the card's connectivity) are
    counted; those below the card's ``min_component_mm3`` are dropped. Of the kept voxels: the
    voxel count, the volume (count x the voxel volume from the slice geometry), the number of
    components and the volume of the largest, and for CT the mean HU (RescaleSlope/Intercept or
    the Modality LUT applied to the source pixel data, which may be compressed; None for a
    segment without kept voxels and for other modalities). A segment is detected when its
    kept volume reaches the card's ``min_volume_mm3`` (:class:`SegmentResult.detected`).
    The returned mask is the input without dropped components and without the segments not
    detected (the input itself when nothing is removed).

    Raises ValueError on a mask that does not fit the datasets, undescribed labels, a geometry
    without a single voxel volume (see :func:`voxel_volume_mm3`), or CT headers without pixel
    data when a segment has voxels.
    """
    mask = np.asarray(mask)
    planes = plane_headers(datasets)
    check_mask(mask, planes)
    labelled = label_counts(mask)
    check_labels(labelled, segments)
    voxel_volume = voxel_volume_mm3(planes)
    kept, selections = _keep_components(mask, planes, segments, labelled, voxel_volume)
    counts, sums, is_ct = _statistics(kept, datasets, planes, segments)
    size = len(counts)

    def count(spec: SegmentSpec) -> int:
        return int(counts[spec.number]) if spec.number < size else 0

    results = tuple(
        SegmentResult(
            segment=spec,
            voxel_count=count(spec),
            volume_mm3=count(spec) * voxel_volume,
            mean_hu=float(sums[spec.number]) / count(spec) if is_ct and count(spec) else None,
            component_count=selections[spec.number].component_count,
            largest_component_mm3=selections[spec.number].largest_voxels * voxel_volume,
        )
        for spec in segments
    )
    undetected = [r.segment.number for r in results if r.voxel_count and not r.detected]
    if undetected:
        kept = kept.copy() if kept is mask else kept
        kept[np.isin(_as_labels(kept), undetected)] = 0
    return MeasuredSegments(kept, results)


def _as_labels(mask: np.ndarray) -> np.ndarray:
    return mask.view(np.uint8) if mask.dtype == np.bool_ else mask


def segment_results(
    mask: np.ndarray, datasets: Sequence[Dataset], segments: Sequence[SegmentSpec]
) -> tuple[SegmentResult, ...]:
    """The segment statistics of :func:`measure_segments` (without the Segmentation's mask:
    a SEG is built from ``measure_segments(...).mask``, which lacks what the card drops)."""
    return measure_segments(mask, datasets, segments).segments
