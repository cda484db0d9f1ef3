"""Synthetic chest-radiograph-like images (CR/DX) with or without a round opacity ("nodule").

Nothing here is clinical data, and nothing here imports torch or MONAI: the demo classification
bundle (``workers/bundles/demo_cr_nodule_cls``) is trained on these images by
``workers/training/train_demo_cls.py``, and tests and ``models evaluate`` data sets are made of
them. The image is indexed ``[row, column]`` in display values (higher is brighter):

* dark air around a bright elliptical body, two darker lung fields, a bright mediastinum;
* faint horizontal rib bands across the lungs;
* when ``finding`` is true, one round opacity (radius 5-10 pixels, 350-600 above the lung) inside a
  lung field;
* Gaussian noise.

:func:`radiograph_dataset` wraps one image as a CR Image Storage (or DX for presentation)
instance, MONOCHROME2, or MONOCHROME1 (inverted stored values) when asked.
"""

from __future__ import annotations

import datetime

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["make_radiograph", "radiograph_dataset"]

_MAX = 4095  # 12 bits stored


def make_radiograph(
    rng: np.random.Generator, finding: bool, size: int = 128
) -> npt.NDArray[np.uint16]:
    """A radiograph-like image ``[row, column]`` (uint16, 0..4095, higher is brighter)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    image = np.full((size, size), 300.0)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.55 + rng.uniform(-0.04, 0.04)
    body = ((x - cx) / rng.uniform(0.40, 0.46)) ** 2 + ((y - cy) / rng.uniform(0.45, 0.5)) ** 2
    image[body < 1] = 1800.0
    lungs = []
    for side in (-1, 1):
        lx, ly = cx + side * rng.uniform(0.17, 0.21), cy - rng.uniform(0.02, 0.08)
        ax, ay = rng.uniform(0.11, 0.14), rng.uniform(0.24, 0.3)
        lung = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2 < 1
        image[lung] = 900.0
        lungs.append((lx, ly, ax, ay))
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * rng.uniform(7, 9) + rng.uniform(0, 1)))
    image += np.where(image == 900.0, 160.0 * ribs, 0.0)
    if finding:
        lx, ly, ax, ay = lungs[int(rng.integers(2))]
        angle = rng.uniform(0, 2 * np.pi)
        reach = rng.uniform(0, 0.55)
        nx, ny = lx + reach * ax * np.cos(angle), ly + reach * ay * np.sin(angle)
        radius = rng.uniform(5, 10) / size
        blob = np.exp(-(((x - nx) ** 2 + (y - ny) ** 2) / (2 * (radius * 0.7) ** 2)))
        image += rng.uniform(350, 600) * np.clip(blob * 1.6, 0, 1)
    image += rng.normal(0, rng.uniform(25, 40), size=image.shape)
    return np.asarray(np.clip(np.rint(image), 0, _MAX), dtype=np.uint16)


def radiograph_dataset(
    image: npt.NDArray[np.uint16],
    *,
    patient_id: str,
    modality: str = "CR",
    monochrome1: bool = False,
    seed: str = "",
) -> Dataset:
    """One CR (or DX) instance holding ``image``; UIDs derive from ``patient_id`` and ``seed``.

    Raises ValueError for a modality other than CR or DX.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, not {modality!r}")
    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else DigitalXRayImageStorageForPresentation
    )
    entropy = ["pacs-agent synthetic radiograph v1", patient_id, seed]
    when = datetime.datetime(2024, 2, 1, 10, 0, 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = patient_id[-16:]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "pacs-agent synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.StudyDescription = "SYNTHETIC CHEST RADIOGRAPH (DEMO)"
    ds.SeriesDescription = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in image.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 1200
    ds.WindowWidth = 2400
    stored = (_MAX - image).astype(np.uint16) if monochrome1 else image.astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds
