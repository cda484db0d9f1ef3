"""Synthetic CT studies for demos and tests: a body phantom with bright "blobs" and its truth mask.

Nothing here is clinical data and nothing here imports torch or MONAI (DESIGN invariant 4): the
listener and the CLI use it to produce a study that can be sent to the service, and the demo
segmentation bundle (``workers/bundles/demo_ct_blob_seg``) is trained on phantoms made by
:func:`make_phantom`.

The phantom is a CT-like volume in Hounsfield units, indexed ``[z, y, x]``:

* air (about -1000 HU) outside an elliptical body;
* a thin subcutaneous fat layer (about -100 HU) and soft tissue (about 40 HU) inside it, with one
  larger, slightly brighter "organ";
* bone that is *not* part of the mask: a bright cylindrical "spine" (400-700 HU) and a few
  "ribs" (300-900 HU), with a partial-volume rim;
* ``n_blobs`` axis-aligned ellipsoidal "lesions", 130-200 HU brighter than the tissue around them,
  with semi-axes of 4-12 voxels in-plane; the mask is 1 inside them;
* Gaussian noise (standard deviation 15-20 HU) everywhere.

:func:`make_ct_study` turns a phantom into a valid CT Image Storage series (explicit VR little
endian, one file per slice) whose UIDs depend only on the seed and patient ID, so the same call
always produces the same study.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "BLOB_CONTRAST_HU",
    "RESCALE_INTERCEPT",
    "make_ct_study",
    "make_ct_study_with_truth",
    "make_phantom",
    "write_study",
]

#: Stored value = HU - RESCALE_INTERCEPT (RescaleSlope 1); stored values are unsigned 12 bit.
RESCALE_INTERCEPT = -1024
#: How much brighter than the surrounding tissue a blob is, in HU (inclusive range).
BLOB_CONTRAST_HU = (130.0, 200.0)

_AIR_HU = -1000.0
_FAT_HU = -100.0
_MAX_STORED = 4095  # 12 bits stored
_ENTROPY_TAG = "pacs-agent synthetic CT demo v1"
_STUDY_DATETIME = datetime.datetime(2024, 1, 15, 9, 30, 0)

RngLike = np.random.Generator | int | None


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def make_phantom(
    shape: tuple[int, int, int] = (40, 256, 256),
    rng: RngLike = None,
    n_blobs: int = 4,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """A CT-like volume in HU and its blob mask, both indexed ``[z, y, x]``.

    ``rng`` is a numpy Generator or a seed (``None`` draws fresh entropy). ``n_blobs`` blobs are
    placed inside the body, away from the spine; where the volume is too small for them some may
    overlap each other. Returns ``(volume_hu, mask)``: ``volume_hu`` is int16 within
    [-1024, 3071]; ``mask`` is uint8, 1 inside a blob and 0 elsewhere.

    Raises ValueError when ``shape`` is too small to hold a body with a blob (less than 8 slices
    or 48 pixels in-plane) or ``n_blobs`` is negative.
    """
    nz, ny, nx = (int(s) for s in shape)
    if nz < 8 or ny < 48 or nx < 48:
        raise ValueError(f"phantom shape {shape} is too small: need at least (8, 48, 48)")
    if n_blobs < 0:
        raise ValueError(f"n_blobs must be >= 0, got {n_blobs}")
    gen = _rng(rng)

    tissue_hu = float(gen.uniform(30.0, 55.0))
    noise_sd = float(gen.uniform(15.0, 20.0))

    yy, xx = np.meshgrid(
        np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij"
    )
    cy = (ny - 1) / 2.0 + gen.uniform(-0.03, 0.03) * ny
    cx = (nx - 1) / 2.0 + gen.uniform(-0.03, 0.03) * nx
    ay = gen.uniform(0.33, 0.40) * ny  # anterior-posterior semi-axis
    ax = gen.uniform(0.40, 0.46) * nx  # left-right semi-axis
    body_r = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)  # 1.0 on the body outline

    plane = np.full((ny, nx), _AIR_HU)
    plane[body_r <= 1.0] = _FAT_HU
    inner = body_r <= 0.92
    plane[inner] = tissue_hu
    # One large organ, a little brighter than the rest of the soft tissue.
    oy, ox = cy - 0.1 * ay, cx - 0.35 * ax
    organ = (((yy - oy) / (0.45 * ay)) ** 2 + ((xx - ox) / (0.4 * ax)) ** 2) <= 1.0
    plane[organ & inner] = tissue_hu + float(gen.uniform(10.0, 25.0))
    # Bone, with a partial-volume rim: the spine, a disc near the posterior (high y) side of the
    # body, and ribs just inside the fat layer. None of it is in the mask.
    sy, sx = cy + 0.6 * ay, cx
    spine_radius = max(4.0, 0.09 * min(ax, ay))
    bones = [(sy, sx, spine_radius, float(gen.uniform(400.0, 700.0)))]
    for angle in gen.uniform(0.0, 2.0 * np.pi, size=int(gen.integers(4, 11))):
        if abs(np.sin(angle) - 1.0) < 0.15:  # not on top of the spine
            continue
        rib_radius = float(gen.uniform(2.0, 4.5)) * max(1.0, min(ax, ay) / 100.0)
        bones.append(
            (
                cy + 0.84 * ay * np.sin(angle),
                cx + 0.84 * ax * np.cos(angle),
                rib_radius,
                float(gen.uniform(300.0, 900.0)),
            )
        )
    bone = np.zeros((ny, nx), dtype=bool)
    for by, bx, radius, bone_hu in bones:
        distance = np.hypot(yy - by, xx - bx)
        weight = np.clip(radius + 0.5 - distance, 0.0, 1.0)  # about one pixel of rim
        plane = np.where(weight > 0, plane + weight * (bone_hu - plane), plane)
        bone |= distance <= radius + 1.0

    volume = np.broadcast_to(plane, (nz, ny, nx)).copy()
    mask = np.zeros((nz, ny, nx), dtype=np.uint8)

    zz_full = np.arange(nz, dtype=np.float64)
    blob_region = inner & ~bone
    for _ in range(n_blobs):
        ry, rx = gen.uniform(4.0, 12.0, size=2)
        rz = gen.uniform(3.0, max(3.0, min(10.0, nz / 4.0)))
        # Centre: a point inside the body far enough from its edge and from the spine.
        for _attempt in range(100):
            py = gen.uniform(cy - 0.85 * ay + ry, cy + 0.85 * ay - ry)
            px = gen.uniform(cx - 0.85 * ax + rx, cx + 0.85 * ax - rx)
            inside = ((py - cy) / (0.92 * ay - ry)) ** 2 + ((px - cx) / (0.92 * ax - rx)) ** 2
            clear_of_spine = np.hypot(py - sy, px - sx) > spine_radius + max(ry, rx) + 2.0
            if inside <= 1.0 and clear_of_spine:
                break
        pz = gen.uniform(min(rz, nz / 2.0), max(nz - 1 - rz, nz / 2.0))
        z0, z1 = max(0, int(pz - rz) - 1), min(nz, int(pz + rz) + 2)
        y0, y1 = max(0, int(py - ry) - 1), min(ny, int(py + ry) + 2)
        x0, x1 = max(0, int(px - rx) - 1), min(nx, int(px + rx) + 2)
        dz = (zz_full[z0:z1, None, None] - pz) / rz
        dy = (yy[None, y0:y1, x0:x1] - py) / ry
        dx = (xx[None, y0:y1, x0:x1] - px) / rx
        blob = ((dz**2 + dy**2 + dx**2) <= 1.0) & blob_region[None, y0:y1, x0:x1]
        contrast = float(gen.uniform(*BLOB_CONTRAST_HU))
        sub = volume[z0:z1, y0:y1, x0:x1]
        sub[blob] = np.maximum(sub[blob], tissue_hu + contrast)
        mask[z0:z1, y0:y1, x0:x1][blob] = 1

    volume += gen.normal(0.0, noise_sd, size=volume.shape)
    hu = np.clip(np.rint(volume), RESCALE_INTERCEPT, _MAX_STORED + RESCALE_INTERCEPT)
    return hu.astype(np.int16), mask


def _uid(*parts: str) -> UID:
    return generate_uid(entropy_srcs=[_ENTROPY_TAG, *parts])


def make_ct_study_with_truth(
    out_dir: Path | None,
    *,
    rows: int = 256,
    cols: int = 256,
    slices: int = 40,
    pixel_spacing: float = 0.8,
    slice_thickness: float = 2.0,
    seed: int = 0,
    patient_id: str = "DEMO-0001",
    study_uid: str | None = None,
    n_blobs: int = 4,
) -> tuple[list[Dataset], npt.NDArray[np.uint8]]:
    """A synthetic CT series and its ground truth: ``(datasets, mask)``.

    ``datasets[k]`` is slice ``k`` (InstanceNumber ``k + 1``, from head to feet) and ``mask[k]``
    (shape ``(slices, rows, cols)``, uint8) is the blob mask on that slice's pixel grid. UIDs depend
    only on ``seed``, ``patient_id`` and ``study_uid`` (generated from the first two when not
    given), so the same arguments give the same study. When ``out_dir`` is given the files are
    written there as ``CT0001.dcm``, ``CT0002.dcm``, ... (the folder is created if needed).

    Raises ValueError for a geometry :func:`make_phantom` refuses.
    """
    if pixel_spacing <= 0 or slice_thickness <= 0:
        raise ValueError("pixel_spacing and slice_thickness must be positive")
    volume_hu, mask = make_phantom((slices, rows, cols), np.random.default_rng(seed), n_blobs)

    key = (patient_id, str(seed))
    study = UID(study_uid) if study_uid else _uid(*key, "study")
    series = _uid(study, *key, "series", str(rows), str(cols), str(slices))
    frame_of_reference = _uid(series, "frame-of-reference")
    date = _STUDY_DATETIME.strftime("%Y%m%d")
    time = _STUDY_DATETIME.strftime("%H%M%S")
    # Centre the in-plane grid on the isocentre; slice 0 is the most superior (head first).
    x0 = -(cols - 1) / 2.0 * pixel_spacing
    y0 = -(rows - 1) / 2.0 * pixel_spacing
    z_top = (slices - 1) / 2.0 * slice_thickness

    datasets: list[Dataset] = []
    for k in range(slices):
        sop_uid = _uid(series, "instance", str(k))
        z = z_top - k * slice_thickness

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "PACS_AGENT_DEMO"

        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        # Patient
        ds.PatientName = "Demo^Synthetic"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        # General Study
        ds.StudyInstanceUID = study
        ds.StudyDate = date
        ds.StudyTime = time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = f"DEMO{seed % 10**12:012d}"
        ds.StudyDescription = "Synthetic CT (demo)"
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.SeriesDate = date
        ds.SeriesTime = time
        ds.SeriesDescription = "Synthetic CT (demo)"
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "pacs-agent demo"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.SoftwareVersions = "1"
        # General Acquisition / General Image
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = date
        ds.AcquisitionTime = time
        ds.ContentDate = date
        ds.ContentTime = time
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        # Image Plane
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.SliceThickness = slice_thickness
        ds.SliceLocation = round(z, 4)
        # CT Image
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        # VOI LUT: a soft-tissue window
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        stored = (volume_hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype("<u2")
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        datasets.append(ds)

    if out_dir is not None:
        write_study(datasets, out_dir)
    return datasets, mask


def make_ct_study(
    out_dir: Path | None,
    *,
    rows: int = 256,
    cols: int = 256,
    slices: int = 40,
    pixel_spacing: float = 0.8,
    slice_thickness: float = 2.0,
    seed: int = 0,
    patient_id: str = "DEMO-0001",
    study_uid: str | None = None,
    n_blobs: int = 4,
) -> list[Dataset]:
    """A synthetic CT series as CT Image Storage datasets (see :func:`make_ct_study_with_truth`)."""
    datasets, _ = make_ct_study_with_truth(
        out_dir,
        rows=rows,
        cols=cols,
        slices=slices,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        seed=seed,
        patient_id=patient_id,
        study_uid=study_uid,
        n_blobs=n_blobs,
    )
    return datasets


def write_study(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write ``datasets`` as DICOM files ``CT0001.dcm``, ... under ``out_dir``; return the paths.

    The files are named by position in ``datasets``. Raises OSError when the folder cannot be
    created or written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for n, ds in enumerate(datasets, start=1):
        path = out_dir / f"CT{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
