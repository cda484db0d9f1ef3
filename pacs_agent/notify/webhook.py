"""Webhook notifications: a JSON document (docs/schemas/notification.schema.json) POSTed
with an HMAC-SHA256 signature.

Signature (Stripe-like, replay-safe): the sender puts the Unix time in
``X-PACS-Agent-Timestamp`` and ``v1=<hex>`` in ``X-PACS-Agent-Signature``, where ``<hex>``
is HMAC-SHA256 with the shared secret over ``"<timestamp>." + body``. A receiver recomputes
it, compares in constant time, refuses a timestamp older than its tolerance (a replay), and
drops a second copy of an ``event_id`` it has already seen (a re-send after a lost answer).
The document carries no patient identifier (study and accession only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from pacs_agent.config import WebhookNotifier
from pacs_agent.notify.facts import NotificationFacts
from pacs_agent.notify.http import post

SCHEMA_ID = "pacs-agent/notification/1"
TIMESTAMP_HEADER = "X-PACS-Agent-Timestamp"
SIGNATURE_HEADER = "X-PACS-Agent-Signature"
EVENT_HEADER = "X-PACS-Agent-Event-Id"


class SignatureError(ValueError):
    """A webhook request whose signature or timestamp does not verify."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def payload(facts: NotificationFacts, now: datetime) -> dict[str, Any]:
    """The webhook document of ``facts`` (see the JSON schema in docs/schemas)."""
    return {
        "schema": SCHEMA_ID,
        "event_id": facts.event_id,
        "event": facts.event,
        "sent_at": now.isoformat(),
        "study": {
            "study_instance_uid": facts.study_instance_uid,
            "accession_number": facts.accession_number or None,
            "study_date": facts.study_date or None,
        },
        "series": {
            "series_instance_uid": facts.series_instance_uid,
            "modality": facts.modality,
        },
        "job": {
            "id": facts.job_id,
            "status": facts.job_status,
            "model": {"name": facts.model_name, "version": facts.model_version},
            "finished_at": _iso(facts.finished_at),
            "reason": facts.job_reason if facts.event == "failed" else None,
        },
        "ai_flag": {
            "study": facts.study_ai_flag,
            "job": facts.job_ai_flag,
            "suggested_priority": facts.suggested_priority,
            "reasons": list(facts.flag_reasons),
        },
        "results": {
            "seg_sop_instance_uid": facts.seg_sop_instance_uid,
            "sr_sop_instance_uid": facts.sr_sop_instance_uid,
        },
        "findings": [
            {
                "kind": f.kind,
                "number": f.number,
                "label": f.label,
                "code": {"value": f.code_value, "scheme": f.code_scheme, "meaning": f.code_meaning},
                "detected": f.detected,
                "flag": f.flag,
                "volume_mm3": f.volume_mm3,
                "mean_hu": f.mean_hu,
                "probability": f.probability,
                "threshold": f.threshold,
                "component_count": f.component_count,
                "largest_component_mm3": f.largest_component_mm3,
            }
            for f in facts.findings
        ],
    }


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256 of "<timestamp>." + body>``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def signed_headers(secret: str, timestamp: int, body: bytes, event_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        EVENT_HEADER: event_id,
    }


def verify(
    secret: str,
    timestamp_header: str | None,
    signature_header: str | None,
    body: bytes,
    now_s: float,
    tolerance_s: float = 300,
) -> int:
    """Check a received webhook; its timestamp when it verifies. Raises SignatureError
    (missing headers, a bad signature, a timestamp outside ``tolerance_s`` of ``now_s``)."""
    if not timestamp_header or not signature_header:
        raise SignatureError("missing timestamp or signature header")
    try:
        timestamp = int(timestamp_header)
    except ValueError:
        raise SignatureError("timestamp is not an integer") from None
    if abs(now_s - timestamp) > tolerance_s:
        raise SignatureError(f"timestamp {timestamp} outside the {tolerance_s:g} s tolerance")
    expected = signature(secret, timestamp, body)
    offered = [s.strip() for s in signature_header.split(",")]
    if not any(hmac.compare_digest(expected, s) for s in offered):
        raise SignatureError("signature does not match")
    return timestamp


def deliver_webhook(
    facts: NotificationFacts, notifier: WebhookNotifier, now: datetime, timeout_s: float
) -> str:
    """POST the signed document; the HTTP status when accepted (2xx). Raises Refused (4xx)
    or Unreachable (no answer, 5xx, 408, 429)."""
    body = encode(payload(facts, now))
    headers = signed_headers(
        notifier.secret.get_secret_value(), int(now.timestamp()), body, facts.event_id
    )
    return post(notifier.url, body, headers, timeout_s=timeout_s, ca_file=notifier.ca_file)
