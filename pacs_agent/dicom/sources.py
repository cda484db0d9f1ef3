"""The source datasets as the result builders hand them to highdicom.

highdicom copies the patient and study of a result from its first source and reads some type 2
attributes as Python attributes (``src_img.PatientID``): a source that leaves one out, as many
older and de-identified images do, would raise ``AttributeError``. :func:`builder_sources`
gives header copies of the sources in which every such attribute the source lacks is present
and empty -- exactly what the standard allows a type 2 attribute to be, so the SEG and SR say
"unknown" where the source did. The sources themselves (the spooled files and the datasets
read from them) are never modified.

highdicom also warns about a patient name it finds odd (one component, say) and puts the name
in the warning; :func:`no_patient_names_in_warnings` keeps such warnings out of the log, which
must hold no patient data.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag

__all__ = ["TYPE2_COPIED", "builder_sources", "no_patient_names_in_warnings"]

#: Type 2 attributes of the Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) modules that
#: highdicom's SEG and SR constructors read from the first source, in module order.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: The enumerated values of Patient's Sex, and empty.
_PATIENT_SEX = frozenset({"M", "F", "O", ""})

#: Pixel data elements: a result never needs its sources' pixels.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _header_copy(ds: Dataset) -> Dataset:
    # Elements not read yet stay unconverted (immutable RawDataElements, shared, decoded with
    # the source's encoding when highdicom reads them); converted ones are copied, so that
    # setting one on the copy leaves the source alone.
    elements: dict[BaseTag, DataElement | RawDataElement] = {
        element.tag: copy.copy(element) if isinstance(element, DataElement) else element
        for element in ds.elements()
        if element.tag not in _PIXEL_TAGS
    }
    header = Dataset(elements)
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        header.set_original_encoding(implicit, little, ds.original_character_set)
    if "file_meta" in ds.__dict__:
        header.file_meta = copy.copy(ds.file_meta)
    for keyword in TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    if str(header.PatientSex or "").strip().upper() not in _PATIENT_SEX:
        # Not one of the enumerated values (PS3.3 C.7.1.1): highdicom refuses it; unknown.
        header.PatientSex = None
    return header


def builder_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Header copies of ``datasets`` (same order) for highdicom's SEG and SR constructors.

    Each copy holds the dataset's elements except pixel data, without decoding or duplicating
    their values (a copy is cheap; setting an element of a copy leaves the source's element
    alone), plus an empty element for each attribute of :data:`TYPE2_COPIED` the dataset
    lacks. A Patient's Sex that is not one of its enumerated values (M, F, O), which highdicom
    refuses, is empty (unknown) in the copy. ``datasets`` are left as they are.
    """
    return [_header_copy(ds) for ds in datasets]


class _DropPatientNames(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "patient_name" not in record.getMessage()


@contextlib.contextmanager
def no_patient_names_in_warnings() -> Iterator[None]:
    """While building a result: drop highdicom's warnings that quote a person name (the
    ``UserWarning`` of its name check and its "patient_name is potentially invalid" record)."""
    logger = logging.getLogger("highdicom.base")
    drop = _DropPatientNames()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*(person name|patient_name)", category=UserWarning
            )
            yield
    finally:
        logger.removeFilter(drop)
