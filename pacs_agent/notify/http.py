"""One HTTP POST of a notification and what its answer means (2xx sent, 4xx refused,
5xx / 408 / 429 / no answer: try again). The body is never logged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import requests

from pacs_agent.notify.errors import Refused, Unreachable

#: Statuses that say "not now" rather than "never".
_TRY_AGAIN = {408, 425, 429}


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    ca_file: Path | None = None,
) -> str:
    """POST ``body``; the HTTP status when it is 2xx. Raises Refused or Unreachable."""
    try:
        response = requests.post(
            url,
            data=body,
            headers=dict(headers),
            timeout=timeout_s,
            verify=str(ca_file) if ca_file is not None else True,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
    status = response.status_code
    detail = response.text[:300].strip()
    if 200 <= status < 300:
        return str(status)
    message = f"HTTP {status} {response.reason}" + (f": {detail}" if detail else "")
    if status >= 500 or status in _TRY_AGAIN:
        raise Unreachable(message, str(status))
    raise Refused(message, str(status))
