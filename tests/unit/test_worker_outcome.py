"""Which failures of a model run are retried (transient) and which fail at once, and the
reason an administrator reads for each (no Python class names, no patient data)."""

from __future__ import annotations

import errno

import highdicom as hd
import pydicom
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.data import get_testdata_file
from sqlalchemy.exc import OperationalError

from pacs_agent.catalog import CatalogError
from pacs_agent.dicom.seg import fit_long_string
from pacs_agent.dicom.volume import SeriesVolumeError
from pacs_agent.domain.jobs import TransientError
from workers.outcome import (
    REDACTED,
    JobStepError,
    JobSteps,
    failure_reason,
    failure_traceback,
    is_transient,
    redact,
)


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which is matched by name."""


@pytest.mark.parametrize(
    "exc",
    [
        TransientError("GPU busy"),
        OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        ConnectionResetError(),
        TimeoutError(),
        OSError(errno.EIO, "Input/output error"),
        OutOfMemoryError("CUDA out of memory"),
    ],
)
def test_resource_hiccups_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("the series has no instances"),
        CatalogError("model 'x' is not in the catalog"),
        FileNotFoundError("spool/1.2.3/4.dcm"),
        PermissionError("results"),
        SoftTimeLimitExceeded(),
        KeyError("PixelData"),
    ],
)
def test_bad_input_bugs_and_time_limits_fail_at_once(exc: BaseException) -> None:
    assert not is_transient(exc)


def _wrapped(inner: BaseException) -> RuntimeError:
    """What MONAI raises when a transform fails: a RuntimeError from the real error."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("applying transform <AsDiscreted>") from exc
    except RuntimeError as outer:
        return outer


def test_a_time_limit_inside_a_monai_transform_is_still_a_time_limit() -> None:
    exc = _wrapped(SoftTimeLimitExceeded())
    assert not is_transient(exc)
    assert failure_reason(exc).startswith("time limit: ")


def test_a_transient_error_inside_a_monai_transform_is_retried() -> None:
    exc = _wrapped(OSError(errno.EIO, "Input/output error"))
    assert is_transient(exc)
    assert failure_reason(exc) == "a transform of the bundle failed: Input/output error"


def _cr() -> pydicom.FileDataset:
    """A real CR (Agfa, MONOCHROME1) from pydicom's test files."""
    path = get_testdata_file("dicomdirtests/77654033/CR1/6154", download=False)
    assert isinstance(path, str)
    return pydicom.dcmread(path)


def _raise(exc: BaseException) -> None:
    raise exc


def _failure(steps: JobSteps, step: str, action: object) -> JobStepError:
    with pytest.raises(JobStepError) as caught, steps.step(step):
        assert callable(action)
        action()
    return caught.value


def test_a_dicom_attribute_missing_from_the_source_is_named_not_the_python_error() -> None:
    cr = _cr()
    del cr.PatientID
    exc = _failure(JobSteps(), "building the TID 1500 SR", lambda: cr.PatientID)
    assert isinstance(exc.__cause__, AttributeError)
    reason = failure_reason(exc)
    assert reason == "building the TID 1500 SR: the source images lack PatientID (0010,0020)"
    by_tag = _failure(JobSteps(), "building the Segmentation", lambda: cr[0x00100020])
    assert failure_reason(by_tag).endswith("the source images lack PatientID (0010,0020)")


def test_an_error_of_pacs_agent_itself_keeps_its_message_under_the_step() -> None:
    exc = _failure(
        JobSteps(),
        "running model demo_ct_blob_seg",
        lambda: _raise(SeriesVolumeError("missing slices: 1 slice(s) absent")),
    )
    assert (
        failure_reason(exc) == "running model demo_ct_blob_seg: missing slices: 1 slice(s) absent"
    )


def test_an_unexpected_error_is_an_internal_error_named_by_where_it_happened() -> None:
    exc = _failure(JobSteps(), "building the TID 1500 SR", lambda: fit_long_string(None))  # type: ignore[arg-type]
    reason = failure_reason(exc)
    assert reason.startswith(
        "building the TID 1500 SR: internal error at pacs_agent/dicom/seg.py:"
    ), reason
    assert "(fit_long_string)" in reason and "traceback is in the worker log" in reason
    assert "TypeError" not in reason and "NoneType" not in reason
    assert "TypeError" in failure_traceback(exc)  # the log keeps the whole story


def test_patient_texts_of_the_sources_stay_out_of_the_reason_and_the_logged_traceback() -> None:
    cr = _cr()
    steps = JobSteps()
    steps.keep_private([cr])
    name, patient_id = str(cr.PatientName), str(cr.PatientID)

    def fail() -> None:
        raise SeriesVolumeError(
            f"odd header of {name} (id {patient_id}, family {name.split('^')[0]})"
        )

    exc = _failure(steps, "reading the series", fail)
    reason = failure_reason(exc)
    logged = failure_traceback(exc)
    for text in (reason, logged):
        for secret in (name, patient_id, name.split("^")[0], name.split("^")[1]):
            assert secret.lower() not in text.lower(), (secret, text)
        assert REDACTED in text
    assert "Traceback" in logged and "SeriesVolumeError" in logged


def test_a_library_that_refuses_the_input_is_named_with_its_message() -> None:
    exc = _failure(
        JobSteps(),
        "building the Segmentation",
        lambda: hd.seg.SegmentDescription(
            segment_number=0,
            segment_label="x",
            segmented_property_category=hd.sr.CodedConcept("1", "SCT", "x"),
            segmented_property_type=hd.sr.CodedConcept("1", "SCT", "x"),
            algorithm_type="MANUAL",
        ),
    )
    assert failure_reason(exc) == (
        "building the Segmentation: highdicom could not use the series: "
        "Segment number must be a positive integer below 65536."
    )


def test_a_patient_text_is_redacted_as_a_word_not_inside_other_words() -> None:
    private = frozenset({"Demo", "DEMO0042"})
    reason = "running model demo_ct_blob_seg: the series of Demo (id DEMO0042) is odd"
    assert redact(reason, private) == (
        f"running model demo_ct_blob_seg: the series of {REDACTED} (id {REDACTED}) is odd"
    )
