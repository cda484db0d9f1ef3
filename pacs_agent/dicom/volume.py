"""Series to volume: one checked voxel grid from the instances of a DICOM series (pure pydicom).

:func:`plan_volume` looks at the headers only (no pixel data needed) and either returns a
:class:`VolumePlan` -- the frames in order along the slice normal, the voxel spacing and the
voxel-to-patient affine -- or raises :class:`SeriesVolumeError` with a reason an administrator
can act on:

* frames of another orientation mixed in (a localizer / scout, or a second plane);
* two frames at one position (a duplicate or a second acquisition in the same series);
* missing slices (a gap that is a whole number of slice steps) and otherwise uneven spacing;
* gantry tilt (the slices step along a direction that is not their normal), unless allowed:
  ``gantry_tilt="resample"`` corrects it onto an orthogonal grid (see below), ``"sheared"`` keeps
  the acquired grid with an affine sheared along the real step (exactly where the slices are);
* frames of different sizes or pixel spacings, and colour images;
* too few slices for the model.

:func:`read_volume` then decodes the pixels (compressed transfer syntaxes through pydicom's
decoders, pylibjpeg for JPEG 2000), applies RescaleSlope/RescaleIntercept (or the per-frame pixel
value transformation of enhanced multi-frame objects), inverts MONOCHROME1 so that higher always
means brighter, and returns a float32 array indexed ``[x, y, z]`` (column, row, slice) -- the
layout of NIfTI and of MONAI's DICOM reader -- with the affine from the plan.

Works on classic single-frame series, on multi-frame objects (enhanced CT/MR with per-frame
functional groups, or one multi-frame image), and on single projection images (CR, DX) that
carry no patient position: those get an in-plane affine from PixelSpacing or ImagerPixelSpacing.

Gantry tilt correction (``gantry_tilt="resample"``), as dcm2niix does it: the tilted slices are
parallel planes whose origins drift in-plane from one slice to the next. Each slice ``z`` is
shifted back in its own plane by ``z`` times that drift (linear interpolation along the row and
column directions, i.e. along the tilt), onto a grid whose axes are the row direction, the
column direction and the slice normal. The grid is widened so that no acquired pixel is cut off
(new voxels get the lowest value of the series: air), and its affine is orthogonal and true:
every voxel sits where the patient was. The plan keeps the acquired frames, so labels predicted
on the grid are mapped back onto each tilted frame through that affine
(``workers.runtime.bundle.labels_on_frames``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

__all__ = [
    "Frame",
    "GantryTilt",
    "SeriesVolumeError",
    "VolumePlan",
    "frames_of",
    "plan_volume",
    "read_volume",
    "resample_tilted",
]

#: Positions closer than this along the normal are the same position, in mm.
POSITION_TOLERANCE_MM = 0.01
#: Relative tolerance on the slice step before spacing counts as uneven.
SPACING_RTOL = 0.01
#: Direction cosines closer than this are one orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Slices whose step deviates from the normal by more than this (degrees) are gantry tilted.
TILT_TOLERANCE_DEG = 0.5
#: What :func:`plan_volume` does with a tilted series.
GantryTilt = Literal["reject", "resample", "sheared"]


class SeriesVolumeError(ValueError):
    """The series cannot be made into one voxel grid; the message is the reason shown."""


@dataclass(frozen=True)
class Frame:
    """One image plane of a series: an instance, or one frame of a multi-frame instance."""

    dataset_index: int
    frame_index: int | None  # None: a single-frame instance
    rows: int
    columns: int
    position: tuple[float, ...] | None  # ImagePositionPatient (3 numbers)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 numbers)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slope: float | None  # from a per-frame/shared transformation group; None: the dataset's own
    intercept: float | None
    uid: str


@dataclass(frozen=True)
class VolumePlan:
    """How the frames of a series make one grid."""

    frames: tuple[Frame, ...]  # in order along the slice normal (z index)
    shape: tuple[int, int, int]  # (columns, rows, slices): x, y, z of the volume read_volume gives
    spacing: tuple[float, float, float]  # mm along x, y, z
    affine: npt.NDArray[np.float64]  # voxel (x, y, z) -> patient LPS, mm
    tilted: bool = False
    #: Angle between the slice step and the slice normal (gantry tilt), degrees.
    tilt_deg: float = 0.0
    #: True when the tilt is corrected: ``shape``/``affine`` are those of the orthogonal grid.
    resampled: bool = False
    #: Resampled plans: grid voxel (x, y) of slice z is acquired pixel
    #: (x + offset[0] - z * drift[0], y + offset[1] - z * drift[1]), in pixels.
    grid_offset: tuple[float, float] = (0.0, 0.0)
    drift_px: tuple[float, float] = (0.0, 0.0)

    @property
    def is_2d(self) -> bool:
        return self.shape[2] == 1


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _group_item(item: Dataset | None, sequence: str) -> Dataset | None:
    if item is None or sequence not in item or not item[sequence].value:
        return None
    first: Dataset = item[sequence].value[0]
    return first


def _functional(item: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """``keyword`` from a per-frame functional group item, else from the shared groups."""
    for group in (item, shared):
        inner = _group_item(group, sequence)
        if inner is not None and keyword in inner:
            return inner.get(keyword)
    return None


def _spacing(*candidates: Any) -> tuple[float, float] | None:
    for candidate in candidates:
        spacing = _floats(candidate, 2)
        if spacing is not None and spacing[0] > 0 and spacing[1] > 0:
            return (spacing[0], spacing[1])
    return None


def frames_of(datasets: Sequence[Dataset]) -> list[Frame]:
    """Every image plane of ``datasets``, with its geometry (headers only).

    Raises SeriesVolumeError for a dataset without Rows/Columns (not an image).
    """
    frames: list[Frame] = []
    for index, ds in enumerate(datasets):
        uid = str(ds.get("SOPInstanceUID", f"#{index}"))
        if "Rows" not in ds or "Columns" not in ds:
            raise SeriesVolumeError(f"instance {uid} is not an image (no Rows/Columns)")
        rows, cols = int(ds.Rows), int(ds.Columns)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        shared = _group_item(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if count > 1 or per_frame is not None:
            for f in range(count):
                item = per_frame[f] if per_frame is not None and f < len(per_frame) else None

                def pick(
                    sequence: str,
                    keyword: str,
                    item: Dataset | None = item,
                    shared: Dataset | None = shared,
                ) -> Any:
                    return _functional(item, shared, sequence, keyword)

                position = _floats(pick("PlanePositionSequence", "ImagePositionPatient"), 3)
                orientation = _floats(
                    pick("PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ) or _floats(ds.get("ImageOrientationPatient"), 6)
                spacing = _spacing(
                    pick("PixelMeasuresSequence", "PixelSpacing"),
                    ds.get("PixelSpacing"),
                    ds.get("ImagerPixelSpacing"),
                ) or (1.0, 1.0)
                slope = pick("PixelValueTransformationSequence", "RescaleSlope")
                intercept = pick("PixelValueTransformationSequence", "RescaleIntercept")
                if position is None and count > 1 and "ImagePositionPatient" in ds:
                    # A classic multi-frame image: frames stacked along the normal.
                    # (RT Dose: GridFrameOffsetVector gives each frame's offset.)
                    base = _floats(ds.ImagePositionPatient, 3)
                    offsets = ds.get("GridFrameOffsetVector")
                    step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 0)
                    offset = (
                        float(offsets[f])
                        if offsets is not None and len(offsets) == count
                        else f * step
                    )
                    if base is not None and orientation is not None and (offsets or step > 0):
                        normal = np.cross(orientation[:3], orientation[3:])
                        shifted = np.asarray(base) + offset * normal
                        position = (float(shifted[0]), float(shifted[1]), float(shifted[2]))
                frames.append(
                    Frame(
                        index,
                        f,
                        rows,
                        cols,
                        position,
                        orientation,
                        spacing,
                        None if slope is None else float(slope),
                        None if intercept is None else float(intercept),
                        f"{uid} frame {f + 1}",
                    )
                )
        else:
            frames.append(
                Frame(
                    index,
                    None,
                    rows,
                    cols,
                    _floats(ds.get("ImagePositionPatient"), 3),
                    _floats(ds.get("ImageOrientationPatient"), 6),
                    _spacing(ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")) or (1.0, 1.0),
                    None,
                    None,
                    uid,
                )
            )
    return frames


def _is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise SeriesVolumeError("ImageOrientationPatient is degenerate (row and column parallel)")
    return np.asarray(normal / norm, dtype=np.float64)


def _projection_plan(frame: Frame) -> VolumePlan:
    dy, dx = frame.pixel_spacing
    orientation = frame.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = np.cross(row, col)
    affine[:3, 3] = frame.position or (0.0, 0.0, 0.0)
    return VolumePlan((frame,), (frame.columns, frame.rows, 1), (dx, dy, 1.0), affine)


def plan_volume(
    datasets: Sequence[Dataset],
    *,
    min_slices: int = 1,
    gantry_tilt: GantryTilt = "reject",
) -> VolumePlan:
    """Order and check the frames of one series; see the module docstring for what is refused.

    ``gantry_tilt``: a tilted series is refused (``"reject"``), corrected onto an orthogonal
    grid (``"resample"``) or kept on its acquired, sheared grid (``"sheared"``).
    ``datasets`` may be headers only, in any order. Raises SeriesVolumeError with the reason.
    """
    if not datasets:
        raise SeriesVolumeError("the series has no instances")
    colour = [ds for ds in datasets if int(ds.get("SamplesPerPixel", 1) or 1) > 1]
    if colour:
        raise SeriesVolumeError(
            f"colour images (SamplesPerPixel {colour[0].SamplesPerPixel}, "
            f"{colour[0].get('PhotometricInterpretation', '?')}) cannot be a grey-level volume"
        )
    frames = frames_of(datasets)
    localizers = [
        f.uid for f in frames if _is_localizer(datasets[f.dataset_index]) and len(frames) > 1
    ]
    if localizers and len(localizers) < len(frames):
        raise SeriesVolumeError(
            f"{len(localizers)} localizer image(s) mixed into the series "
            f"(ImageType LOCALIZER: {', '.join(localizers[:3])}); a volume needs one stack"
        )
    sizes = sorted({(f.rows, f.columns) for f in frames})
    if len(sizes) > 1:
        raise SeriesVolumeError(f"frames of different sizes in one series: {sizes}")
    if len(frames) == 1 and (frames[0].position is None or frames[0].orientation is None):
        if min_slices > 1:
            raise SeriesVolumeError(f"too few slices: 1 image, the model needs {min_slices}")
        return _projection_plan(frames[0])
    missing = [f.uid for f in frames if f.position is None or f.orientation is None]
    if missing:
        raise SeriesVolumeError(
            f"{len(missing)} frame(s) lack ImagePositionPatient/ImageOrientationPatient "
            f"(e.g. {missing[0]}): their place in the volume is unknown"
        )
    reference = np.asarray(frames[0].orientation, dtype=np.float64)
    groups: dict[tuple[float, ...], int] = {}
    for f in frames:
        key = tuple(np.round(np.asarray(f.orientation), 2))
        groups[key] = groups.get(key, 0) + 1
    odd = [
        f.uid
        for f in frames
        if not np.allclose(np.asarray(f.orientation), reference, atol=ORIENTATION_TOLERANCE)
    ]
    if odd:
        raise SeriesVolumeError(
            f"mixed orientations: {len(groups)} different ImageOrientationPatient values in one "
            f"series ({len(odd)} frame(s) differ from the first, e.g. {odd[0]}); "
            "a localizer or a second plane is mixed in"
        )
    spacings = sorted({f.pixel_spacing for f in frames})
    if not np.allclose(np.asarray(spacings), np.asarray(spacings[0]), atol=1e-3):
        raise SeriesVolumeError(f"frames with different PixelSpacing in one series: {spacings}")
    normal = _normal(frames[0].orientation or ())
    along = np.asarray([float(np.dot(normal, f.position or ())) for f in frames])
    order = np.argsort(along, kind="stable")
    ordered = [frames[i] for i in order]
    positions = along[order]
    if len(ordered) < min_slices:
        raise SeriesVolumeError(
            f"too few slices: {len(ordered)}, the model needs at least {min_slices}"
        )
    dy, dx = ordered[0].pixel_spacing
    row = np.asarray(ordered[0].orientation[:3])
    col = np.asarray(ordered[0].orientation[3:])
    origin = np.asarray(ordered[0].position)
    tilted = False
    angle = 0.0
    if len(ordered) == 1:
        step_vector = normal * 1.0
        dz = 1.0
    else:
        steps = np.diff(positions)
        duplicates = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
        if len(duplicates):
            i = int(duplicates[0])
            raise SeriesVolumeError(
                f"duplicate positions: {len(duplicates)} pair(s) of frames share a position "
                f"along the normal (e.g. {ordered[i].uid} and {ordered[i + 1].uid} at "
                f"{positions[i]:.2f} mm); a repeated acquisition is mixed in"
            )
        dz = float(np.min(steps))
        ratios = steps / dz
        whole = np.rint(ratios)
        if np.all(np.abs(ratios - whole) <= SPACING_RTOL * np.maximum(ratios, 1)) and np.any(
            whole > 1
        ):
            at = int(np.flatnonzero(whole > 1)[0])
            lost = int(np.sum(whole - 1))
            raise SeriesVolumeError(
                f"missing slices: {lost} slice(s) absent at a {dz:.2f} mm step (first gap of "
                f"{steps[at]:.2f} mm after position {positions[at]:.2f} mm); the series is "
                "incomplete"
            )
        if not np.allclose(steps, dz, rtol=SPACING_RTOL, atol=POSITION_TOLERANCE_MM):
            raise SeriesVolumeError(
                f"inconsistent slice spacing: steps from {float(steps.min()):.3f} to "
                f"{float(steps.max()):.3f} mm along the normal"
            )
        last = np.asarray(ordered[-1].position)
        step_vector = (last - origin) / (len(ordered) - 1)
        cos = float(np.dot(step_vector, normal) / np.linalg.norm(step_vector))
        angle = float(np.degrees(np.arccos(np.clip(abs(cos), -1.0, 1.0))))
        if angle > TILT_TOLERANCE_DEG:
            if gantry_tilt == "reject":
                raise SeriesVolumeError(
                    f"gantry tilt: the slices step {angle:.1f} degrees off their normal; "
                    "this model does not accept tilted series"
                )
            tilted = True
        else:
            step_vector = normal * dz
            angle = 0.0
    if tilted and gantry_tilt == "resample":
        return _resampled_plan(tuple(ordered), row, col, normal, origin, step_vector, angle)
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = step_vector
    affine[:3, 3] = origin
    dz_mm = float(np.linalg.norm(step_vector))
    return VolumePlan(
        tuple(ordered),
        (ordered[0].columns, ordered[0].rows, len(ordered)),
        (dx, dy, dz_mm),
        affine,
        tilted,
        angle,
    )


def _resampled_plan(
    ordered: tuple[Frame, ...],
    row: npt.NDArray[np.float64],
    col: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    origin: npt.NDArray[np.float64],
    step_vector: npt.NDArray[np.float64],
    angle: float,
) -> VolumePlan:
    """The orthogonal grid that holds every pixel of a tilted stack (module docstring)."""
    dy, dx = ordered[0].pixel_spacing
    columns, rows, slices = ordered[0].columns, ordered[0].rows, len(ordered)
    dz = float(np.dot(step_vector, normal))
    # In-plane drift of each slice's origin per slice, in pixels along the row and column.
    drift = (float(np.dot(step_vector, row)) / dx, float(np.dot(step_vector, col)) / dy)
    offsets: list[float] = []
    sizes: list[int] = []
    for pixels, d in ((columns, drift[0]), (rows, drift[1])):
        low = float(np.floor(min(0.0, d * (slices - 1)) + 1e-6))
        high = float(np.ceil(pixels - 1 + max(0.0, d * (slices - 1)) - 1e-6))
        offsets.append(low)
        sizes.append(int(high - low) + 1)
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = normal * dz
    affine[:3, 3] = origin + offsets[0] * dx * row + offsets[1] * dy * col
    return VolumePlan(
        ordered,
        (sizes[0], sizes[1], slices),
        (dx, dy, dz),
        affine,
        tilted=True,
        tilt_deg=angle,
        resampled=True,
        grid_offset=(offsets[0], offsets[1]),
        drift_px=drift,
    )


def _shift_axis(
    image: npt.NDArray[np.float64], axis: int, start: float, size: int, fill: float
) -> npt.NDArray[np.float64]:
    """``size`` samples of ``image`` along ``axis`` at positions ``start, start + 1, ...``
    (linear interpolation between neighbours; ``fill`` outside the image)."""
    n = image.shape[axis]
    where = start + np.arange(size, dtype=np.float64)
    below = np.floor(where).astype(np.int64)
    weight = where - below
    moved = np.moveaxis(image, axis, 0)
    low = np.clip(below, 0, n - 1)
    high = np.clip(below + 1, 0, n - 1)
    shape = (size,) + (1,) * (moved.ndim - 1)
    out = moved[low] * (1.0 - weight).reshape(shape) + moved[high] * weight.reshape(shape)
    inside = (where >= -1e-6) & (where <= n - 1 + 1e-6)
    out[~inside] = fill
    return np.moveaxis(out, 0, axis)


def resample_tilted(acquired: npt.NDArray[np.float32], plan: VolumePlan) -> npt.NDArray[np.float32]:
    """The acquired slices ``[x, y, z]`` of a tilted stack on the orthogonal grid of ``plan``.

    Slice ``z`` is shifted in its own plane by ``z`` times the drift (linear interpolation);
    grid voxels that no acquired pixel covers get the lowest value of the series.
    """
    if not plan.resampled:
        return acquired
    columns, rows, slices = plan.shape
    fill = float(acquired.min()) if acquired.size else 0.0
    out = np.empty((columns, rows, slices), dtype=np.float32)
    for z in range(slices):
        image = acquired[:, :, z].astype(np.float64)
        x0 = plan.grid_offset[0] - z * plan.drift_px[0]
        y0 = plan.grid_offset[1] - z * plan.drift_px[1]
        image = _shift_axis(image, 0, x0, columns, fill)
        out[:, :, z] = _shift_axis(image, 1, y0, rows, fill)
    return out


def _frame_pixels(ds: Dataset, frame: Frame, cache: dict[int, np.ndarray]) -> np.ndarray:
    if frame.dataset_index not in cache:
        try:
            cache[frame.dataset_index] = np.asarray(ds.pixel_array)
        except Exception as exc:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            raise SeriesVolumeError(
                f"pixel data of {ds.get('SOPInstanceUID', '?')} cannot be decoded "
                f"(transfer syntax {syntax}): {exc}"
            ) from exc
    pixels = cache[frame.dataset_index]
    if frame.frame_index is not None and pixels.ndim == 3:
        return np.asarray(pixels[frame.frame_index])
    return pixels


def read_volume(datasets: Sequence[Dataset], plan: VolumePlan) -> npt.NDArray[np.float32]:
    """Decoded, rescaled voxels ``[x, y, z]`` (float32) of the frames in ``plan``.

    ``datasets`` are the full datasets (with pixel data) that the plan was made from. Stored
    values go through RescaleSlope/RescaleIntercept; MONOCHROME1 images are inverted within
    their stored range so that higher values are brighter. A resampled plan (gantry tilt
    corrected) gives the volume on its orthogonal grid (:func:`resample_tilted`). Raises
    SeriesVolumeError when pixel data cannot be decoded.
    """
    columns, rows, slices = plan.frames[0].columns, plan.frames[0].rows, len(plan.frames)
    out = np.empty((columns, rows, slices), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for z, frame in enumerate(plan.frames):
        ds = datasets[frame.dataset_index]
        stored = _frame_pixels(ds, frame, cache).astype(np.float64)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            bits = int(ds.get("BitsStored", 16) or 16)
            if int(ds.get("PixelRepresentation", 0) or 0) == 0:
                stored = float(2**bits - 1) - stored
            else:
                stored = -stored
        slope = frame.slope if frame.slope is not None else float(ds.get("RescaleSlope", 1) or 1)
        intercept = (
            frame.intercept
            if frame.intercept is not None
            else float(ds.get("RescaleIntercept", 0) or 0)
        )
        out[:, :, z] = (stored * slope + intercept).T
        if frame.frame_index is None:
            cache.pop(frame.dataset_index, None)
    return resample_tilted(out, plan)
