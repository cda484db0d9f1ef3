"""A PNG of a job's SEG over one slice of its source series, for the dashboard.

The slice is the middle one of those the SEG marks (the middle slice of the series when it
marks none), read from the spooled source instance, windowed (its own Window Center/Width,
or a soft-tissue window for CT), with each segment filled half-transparent and outlined.
Pure apart from reading the files: numpy and Pillow, no torch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

#: Segment colours (RGB), by segment number - 1, repeating.
PALETTE = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (120, 255, 120),
    (255, 120, 255),
    (255, 150, 40),
)
#: The thumbnail's width in pixels (height follows the aspect ratio).
WIDTH = 512


class OverlayError(ValueError):
    """The overlay cannot be drawn; the message says why."""


def _frame_refs(seg: Dataset) -> list[tuple[str | None, int]]:
    """(source SOP Instance UID, segment number) of each SEG frame; a functional group may
    sit in the shared sequence (one segment) instead of each frame's."""
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]

    def group(item: Dataset, keyword: str) -> Dataset | None:
        seq = item.get(keyword) or shared.get(keyword)
        return seq[0] if seq else None

    refs: list[tuple[str | None, int]] = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        ident = group(item, "SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber) if ident is not None else 1
        uid = None
        derivation = group(item, "DerivationImageSequence")
        if derivation is not None and derivation.get("SourceImageSequence"):
            uid = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        refs.append((uid, number))
    return refs


def _order_key(ds: Dataset) -> tuple[float, int]:
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None and len(orientation) == 6:
        row = np.array([float(v) for v in orientation[:3]])
        col = np.array([float(v) for v in orientation[3:]])
        return float(np.dot(np.cross(row, col), [float(v) for v in position])), 0
    return 0.0, int(ds.get("InstanceNumber") or 0)


def _windowed(ds: Dataset) -> npt.NDArray[np.uint8]:
    pixels = ds.pixel_array.astype(np.float64)
    if pixels.ndim != 2:
        raise OverlayError(f"source instance has pixel data of shape {pixels.shape}, not 2-D")
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
    elif ds.get("Modality") == "CT":
        c, w = 40.0, 400.0  # soft tissue
    else:
        lo, hi = np.percentile(pixels, [1, 99])
        c, w = (lo + hi) / 2, max(float(hi - lo), 1.0)
    scaled = np.clip((pixels - (c - w / 2)) / max(w, 1.0), 0, 1) * 255
    out: npt.NDArray[np.uint8] = scaled.astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255 - out
    return out


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge: npt.NDArray[np.bool_] = mask & ~inner
    return edge


def render_overlay(seg_path: Path, source_paths: Sequence[Path]) -> bytes:
    """The PNG bytes of the SEG at ``seg_path`` over one slice of ``source_paths``.

    Raises OverlayError when the files cannot be read or do not match.
    """
    try:
        seg = dcmread(seg_path)
        masks = np.asarray(seg.pixel_array)
    except Exception as exc:
        raise OverlayError(f"cannot read the SEG: {type(exc).__name__}: {exc}") from exc
    if masks.ndim == 2:
        masks = masks[np.newaxis]
    try:
        refs = _frame_refs(seg)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise OverlayError(f"the SEG's frames cannot be matched to the source: {exc}") from exc
    headers: dict[str, tuple[Path, Dataset]] = {}
    for path in source_paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        headers[str(ds.SOPInstanceUID)] = (path, ds)
    if not headers:
        raise OverlayError("no source instance of the series is readable in the spool")
    ordered = sorted(headers, key=lambda uid: _order_key(headers[uid][1]))
    marked = {uid for (uid, _n), m in zip(refs, masks, strict=False) if uid and m.any()}
    candidates = [uid for uid in ordered if uid in marked] or ordered
    chosen = candidates[len(candidates) // 2]
    try:
        source = dcmread(headers[chosen][0])
        base = _windowed(source)
    except OverlayError:
        raise
    except Exception as exc:
        raise OverlayError(f"cannot decode the source slice: {type(exc).__name__}") from exc
    rgb = np.repeat(base[:, :, np.newaxis], 3, axis=2).astype(np.float64)
    for (uid, number), mask in zip(refs, masks, strict=False):
        if uid != chosen or not mask.any():
            continue
        if mask.shape != base.shape:
            raise OverlayError(f"SEG frame {mask.shape} does not match the slice {base.shape}")
        on = mask.astype(bool)
        color = np.array(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float64)
        rgb[on] = rgb[on] * 0.55 + color * 0.45
        rgb[_outline(on)] = color
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    height = max(1, round(image.height * WIDTH / image.width))
    image = image.resize((WIDTH, height), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
