"""A gantry-tilted CT series derived from the real 20-slice CT in ``../shared/data``.

No real tilted acquisition is available offline (pydicom's test files hold one single tilted
image, no series), so this helper *derives* one: the real slices keep their pixels and their
table positions (2 mm apart along the patient's z axis), and their image plane is declared
tilted about the patient's x axis by ``degrees`` (ImageOrientationPatient column direction
``(0, cos, sin)``, GantryDetectorTilt ``-degrees``), which is how a tilted head CT is stored:
parallel slices whose step is not along their normal. The anatomy is therefore not where a real
tilted scan would show it; the geometry is. To test where things land, a known object -- a
sphere given in patient coordinates -- is burned into every tilted frame at the pixels whose
centres lie inside it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: The tilt of the derived series, degrees (a usual head CT tilt).
TILT_DEG = 18.5
#: Hounsfield units of the burned-in sphere.
SPHERE_HU = 3000.0  # above any tissue of the real CT (its maximum is 1839)


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]  # patient LPS, mm
    radius_mm: float

    def contains(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """``points`` (..., 3) in patient coordinates: True inside."""
        offset = points - np.asarray(self.center)
        return np.asarray(np.sum(offset * offset, axis=-1) <= self.radius_mm**2)


def pixel_centres(ds: Dataset) -> npt.NDArray[np.float64]:
    """Patient coordinates (rows, columns, 3) of every pixel centre of a frame (PS3.3
    C.7.6.2.1.1)."""
    position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dy, dx = (float(v) for v in ds.PixelSpacing)
    r = np.arange(int(ds.Rows), dtype=np.float64)[:, None, None]
    c = np.arange(int(ds.Columns), dtype=np.float64)[None, :, None]
    return np.asarray(position + c * dx * orientation[:3] + r * dy * orientation[3:])


def tilted_series(
    datasets: Sequence[Dataset], sphere: Sphere, degrees: float = TILT_DEG
) -> list[Dataset]:
    """Copies of the real axial ``datasets`` declared tilted by ``degrees`` about the x axis, with
    ``sphere`` burned in (uncompressed pixel data). The input datasets are left unchanged."""
    angle = math.radians(degrees)
    out: list[Dataset] = []
    for source in datasets:
        ds = copy.deepcopy(source)
        ds.decompress()
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle)]
        ds.GantryDetectorTilt = -degrees
        stored = np.array(ds.pixel_array)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        stored[sphere.contains(pixel_centres(ds))] = round((SPHERE_HU - intercept) / slope)
        ds.PixelData = stored.astype(stored.dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def sphere_inside_series(
    datasets: Sequence[Dataset], radius_mm: float = 12.0, degrees: float = TILT_DEG
) -> Sphere:
    """A sphere in the middle of the tilted series: centred on the centre pixel of its middle
    frame (the frame as :func:`tilted_series` declares it)."""
    middle = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))[len(datasets) // 2]
    header = Dataset()
    header.ImagePositionPatient = middle.ImagePositionPatient
    header.PixelSpacing = middle.PixelSpacing
    header.Rows, header.Columns = middle.Rows, middle.Columns
    angle = math.radians(degrees)
    header.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle)]
    centre = pixel_centres(header)[int(middle.Rows) // 2, int(middle.Columns) // 2]
    return Sphere((float(centre[0]), float(centre[1]), float(centre[2])), radius_mm)


def write_tilted_study(
    workdir: Path, tag: str, *, drop: Sequence[int] = (), radius_mm: float = 12.0
) -> tuple[list[Path], Sphere, list[Dataset]]:
    """The tilted series as a study of its own (UIDs derived from ``tag``), written as files.

    The real CT is repaired first (tests/helpers/realct.py); ``drop`` leaves out slices by
    their index along the table. Returns (files, the sphere, the datasets written).
    """
    from tests.helpers.realct import REAL_CT_DIR, repair_real_ct

    repaired = repair_real_ct(REAL_CT_DIR, workdir / f"{tag}-repaired")
    real = sorted(
        (pydicom.dcmread(p) for p in repaired), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    sphere = sphere_inside_series(real, radius_mm=radius_mm)
    series = tilted_series(real, sphere)
    entropy = ["pacs-agent tilted test study", tag]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    out_dir = workdir / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    kept: list[Dataset] = []
    for index, ds in enumerate(series):
        if index in drop:
            continue
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = "Derived tilted test series (not a real tilted acquisition)"
        ds.PatientID = f"TILT-{tag}"
        path = out_dir / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        kept.append(ds)
    return files, sphere, kept
