"""Which failures of a model run are retried (transient) and which fail at once."""

from __future__ import annotations

import errno

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from pacs_agent.catalog import CatalogError
from pacs_agent.domain.jobs import TransientError
from workers.outcome import failure_reason, is_transient


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
    assert failure_reason(exc).startswith("SoftTimeLimitExceeded")


def test_a_transient_error_inside_a_monai_transform_is_retried() -> None:
    exc = _wrapped(OSError(errno.EIO, "Input/output error"))
    assert is_transient(exc)
    assert failure_reason(exc) == "RuntimeError: applying transform <AsDiscreted>"
