"""STOW-RS: send result objects to a DICOMweb origin server with dicomweb-client.

One HTTP request per call carries every object (multipart/related; type="application/dicom").
The outcome of each object is read from the Store Instances Response Module (PS3.18 10.5.3):
an object in the Failed SOP Sequence failed with its Failure Reason, one in the Referenced SOP
Sequence was stored (with a Warning Reason perhaps). Retries are the exporter's business, so
dicomweb-client's own retrying is switched off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from pacs_agent.net.scu import StoreOutcome


class StowFailed(ConnectionError):
    """The DICOMweb server could not be reached or refused the whole request."""


@dataclass(frozen=True)
class StowAuth:
    """HTTP authentication of a DICOMweb destination: basic or bearer token (or none)."""

    username: str | None = None
    password: str | None = None
    token: str | None = None


def _session(auth: StowAuth, ca_file: Path | None) -> requests.Session:
    session = requests.Session()
    if auth.username is not None:
        session.auth = (auth.username, auth.password or "")
    if auth.token is not None:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    if ca_file is not None:
        session.verify = str(ca_file)
    return session


def _uids(response: Dataset, sequence: str) -> dict[str, Dataset]:
    return {str(item.ReferencedSOPInstanceUID): item for item in response.get(sequence, [])}


def stow_files(
    *,
    url: str,
    paths: Sequence[Path],
    auth: StowAuth | None = None,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
) -> list[StoreOutcome]:
    """Store ``paths`` with one STOW-RS request to ``url`` (the DICOMweb base URL).

    One outcome per file, in order; ``status`` is 0 for a stored object, 0xB000 for one stored
    with a warning, 0xC000 for a failed one (with the server's Failure Reason in ``error``).
    Raises StowFailed when the server cannot be reached or answers the request with an HTTP
    error and no per-object response.
    """
    datasets: list[tuple[Path, Dataset]] = [(p, dcmread(p)) for p in paths]
    client = DICOMwebClient(
        url=url, session=_session(auth or StowAuth(), ca_file), timeout=timeout_s
    )
    client.set_http_retry_params(retry=False)
    try:
        response = client.store_instances([ds for _, ds in datasets])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise StowFailed(f"STOW-RS to {url}: HTTP {status}") from exc
    except requests.RequestException as exc:
        raise StowFailed(f"STOW-RS to {url}: {type(exc).__name__}") from exc
    stored = _uids(response, "ReferencedSOPSequence")
    failed = _uids(response, "FailedSOPSequence")
    outcomes: list[StoreOutcome] = []
    for path, ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            reason = failed[uid].get("FailureReason")
            detail = f"0x{int(reason):04X}" if reason is not None else "no reason given"
            outcomes.append(StoreOutcome(path, uid, 0xC000, f"STOW-RS failure reason {detail}"))
        elif uid in stored:
            warning = stored[uid].get("WarningReason")
            outcomes.append(StoreOutcome(path, uid, 0xB000 if warning else 0, None))
        else:
            outcomes.append(
                StoreOutcome(path, uid, None, "the STOW-RS response does not name this object")
            )
    return outcomes
