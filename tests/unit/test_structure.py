from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacs_agent.dicom.structure import Truncated, check_complete, file_meta_end

# Explicit and implicit VR, big endian, JPEG / JPEG 2000 / RLE encapsulated pixel data,
# sequences of undefined length, a SEG and an SR.
FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "test-SR.dcm",
    "SC_rgb_small_odd.dcm",
    "image_dfl.dcm",
]


def _part10(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    ds = dcmread(path)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("name", FILES)
def test_well_formed_data_sets_pass(name: str) -> None:
    data = _part10(name)
    ts = dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    check_complete(data, file_meta_end(data), ts)


@pytest.mark.parametrize("name", [n for n in FILES if n != "image_dfl.dcm"])
def test_data_set_cut_anywhere_is_truncated(name: str) -> None:
    data = _part10(name)
    start = file_meta_end(data)
    ts = dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    for cut in (start + 5, (start + len(data)) // 2, len(data) - 1):
        with pytest.raises(Truncated):
            check_complete(data[:cut], start, ts)


def test_real_jpeg2000_ct_passes(shared_data: Path) -> None:
    for path in sorted((shared_data / "ct_torso_human_totalseg_20sl").iterdir())[:3]:
        data = path.read_bytes()
        ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        check_complete(data, file_meta_end(data), ts)
