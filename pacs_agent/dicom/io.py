"""Reading and writing DICOM Part-10 files, durably.

A result file is written to a temporary file in the target's directory, flushed and fsynced,
then renamed over the target (``os.replace``) and the directory fsynced: a reader never sees a
half-written file and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileDataset

#: Permission bits of a written file (mkstemp would leave 0600).
FILE_MODE = 0o644


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM Part-10 file (preamble, file meta) at ``path``, atomically.

    Creates missing parent directories and replaces an existing file. Returns the path.
    Raises OSError when the file cannot be written (nothing is left behind at ``path`` or
    beside it), and pydicom's errors when ``ds`` cannot be encoded as a Part-10 file (for
    instance without a Transfer Syntax UID in its file meta).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)
    return target


def read_header(path: str | os.PathLike[str]) -> FileDataset:
    """The dataset at ``path`` without its pixel data (``stop_before_pixels``).

    Raises pydicom's InvalidDicomError for a file that is not DICOM, OSError if unreadable.
    """
    return dcmread(path, stop_before_pixels=True)
