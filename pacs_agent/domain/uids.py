"""Deterministic UID derivation (DESIGN invariant 3).

A result's UIDs derive from a configured UID root and the job's identity and model version,
so re-running or re-exporting a job produces the same UIDs and the PACS replaces the object
instead of storing a duplicate.
"""

from __future__ import annotations

import hashlib
import re

#: The UUID-derived root of PS3.5 B.2: needs no registration.
DEFAULT_UID_ROOT = "2.25"

_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MAX_UID_LENGTH = 64


def validate_uid_root(root: str) -> str:
    """Return ``root`` if it can prefix a UID; raise ValueError saying why not."""
    if not _ROOT_RE.match(root):
        raise ValueError(f"UID root {root!r} is not a dotted list of numbers without leading zeros")
    if len(root) > 40:
        raise ValueError(f"UID root {root!r} is longer than 40 characters: no room for a suffix")
    return root


def derive_uid(root: str, *parts: str) -> str:
    """A UID that depends only on ``root`` and ``parts``.

    The suffix is the SHA-256 of the parts as a decimal number, cut to fit 64 characters.
    For the ``2.25`` root it is 128 bits, as PS3.5 B.2 asks.
    """
    validate_uid_root(root)
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    room = _MAX_UID_LENGTH - len(root) - 1
    number = int.from_bytes(digest[:16], "big")
    suffix = str(number)[:room].lstrip("0") or "0"
    return f"{root}.{suffix}"


def device_uid(root: str, model_name: str, model_version: str) -> str:
    """Device UID of a model: changes whenever the model's name or version changes."""
    return derive_uid(root, "device", model_name, model_version)


def job_result_uids(
    root: str, study_uid: str, series_uid: str, model_name: str, model_version: str
) -> tuple[str, str, str, str]:
    """(SEG series, SEG instance, SR series, SR instance) UIDs for one job.

    The job's identity is the source series and the model; a reprocess of the same series with
    the same model version gives the same UIDs, a new model version gives new ones.
    """
    base = ("result", study_uid, series_uid, model_name, model_version)
    return (
        derive_uid(root, *base, "seg-series"),
        derive_uid(root, *base, "seg-instance"),
        derive_uid(root, *base, "sr-series"),
        derive_uid(root, *base, "sr-instance"),
    )


def failure_notice_uids(
    root: str, study_uid: str, series_uid: str, model_name: str, model_version: str
) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the failure notice SR of one job.

    The same identity as :func:`job_result_uids`, so another failure of the same job replaces
    the notice; distinct from the result UIDs, so a notice is never taken for a result.
    """
    base = ("failure-notice", study_uid, series_uid, model_name, model_version)
    return derive_uid(root, *base, "series"), derive_uid(root, *base, "instance")


def workitem_uid(root: str, study_uid: str, series_uid: str, model_name: str, job_id: int) -> str:
    """SOP Instance UID of the Unified Procedure Step of one job (IHE AIW-I).

    One per job: a reprocess creates a new job, so a new workitem; the same job always has
    the same workitem UID (a lost workitem row is recreated with it).
    """
    return derive_uid(root, "ups", study_uid, series_uid, model_name, str(job_id))
