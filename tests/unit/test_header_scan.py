"""The listener's header scanner reads what pydicom reads, straight from the bytes."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from pacs_agent.demo.synthetic import make_ct_study
from pacs_agent.dicom.header import instance_header
from pacs_agent.dicom.structure import Truncated, UnsupportedEncoding, header_values
from pacs_agent.net.scp import read_header

FILES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "JPEG2000.dcm",  # encapsulated pixel data
    "image_dfl.dcm",  # deflated: read by pydicom
    "SC_rgb_rle.dcm",
]


def _slow(data: bytes) -> object:
    return instance_header(dcmread(BytesIO(data), stop_before_pixels=True))


@pytest.mark.parametrize("name", FILES)
def test_scanned_header_equals_pydicoms(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None, name
    data = Path(path).read_bytes()
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    try:
        header = read_header(data, syntax)
    except ValueError as exc:  # e.g. an invalid UID: both readers must refuse it
        with pytest.raises(type(exc)):
            _slow(data)
        return
    assert header == _slow(data)


def test_scanned_header_of_synthetic_ct_equals_pydicoms(tmp_path: Path) -> None:
    ds = make_ct_study(None, slices=8, rows=48, cols=48, seed=1)[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    header = read_header(data, ds.file_meta.TransferSyntaxUID)
    assert header == _slow(data)
    assert header.image_type == "ORIGINAL\\PRIMARY\\AXIAL"


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("ISO_IR 100", "Thorax über Knie"),
        ("ISO_IR 192", "胸部 Knie"),
        ("ISO_IR 144", "Грудная клетка"),  # Cyrillic: left to pydicom
    ],
)
def test_text_in_a_character_set_reads_as_pydicom_reads_it(
    tmp_path: Path, charset: str, text: str
) -> None:
    ds = make_ct_study(None, slices=8, rows=48, cols=48, seed=3)[0]
    ds.SpecificCharacterSet = charset
    ds.StudyDescription = text
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    header = read_header(data, ds.file_meta.TransferSyntaxUID)
    assert header == _slow(data)
    assert header.study_description == text


def test_scanner_leaves_deflate_and_other_charsets_to_pydicom() -> None:
    path = get_testdata_file("image_dfl.dcm")
    assert path is not None
    with pytest.raises(UnsupportedEncoding):
        header_values(Path(path).read_bytes(), 0, UID("1.2.840.10008.1.2.1.99"))


def test_scanner_refuses_truncated_data(tmp_path: Path) -> None:
    ds = make_ct_study(None, slices=8, rows=48, cols=48, seed=2)[0]
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    with pytest.raises(Truncated):
        read_header(data[:-10], ds.file_meta.TransferSyntaxUID)


def test_part10_prefix_equals_the_file_meta_pydicom_writes() -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from pacs_agent.dicom.structure import part10_prefix

    for sop_uid in ("1.2.3.4", "1.2.3.45"):  # odd and even lengths
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_file_meta_info(buffer, meta, enforce_standard=True)
        expected = b"\x00" * 128 + b"DICM" + buffer.getvalue()
        assert (
            part10_prefix(
                "1.2.840.10008.5.1.4.1.1.2",
                sop_uid,
                "1.2.840.10008.1.2.1",
                PYNETDICOM_IMPLEMENTATION_UID,
                PYNETDICOM_IMPLEMENTATION_VERSION,
            )
            == expected
        )
