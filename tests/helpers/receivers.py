"""Real receivers of worklist notifications for tests, each on a free loopback port.

- :class:`Hl7Receiver`: hl7apy's MLLP server (``hl7apy.mllp.MLLPServer``) with an ORU^R01
  handler that parses each message (v2.5.1) and answers an ACK with the code the test sets
  (AA, AE, AR), or none at all.
- :class:`FhirServer`: a small FHIR endpoint (http.server) that checks the bearer token,
  validates each transaction Bundle and its resources with fhir.resources (R4B models), stores
  it, and answers a transaction-response Bundle; 400 with an OperationOutcome when invalid.
- :class:`WebhookReceiver`: checks the HMAC signature and timestamp (``verify``), drops a
  second copy of an event id, validates the document against docs/schemas with jsonschema.

Each can be told to answer with an error status, to test what the sender makes of it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from pydantic import ValidationError

from pacs_agent.notify.webhook import (
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify,
)
from tests.helpers.paths import REPO
from tests.helpers.servers import free_port

SCHEMA_PATH = REPO / "docs" / "schemas" / "notification.schema.json"


@dataclass
class Hl7Receiver:
    """A real MLLP listener (hl7apy) that keeps every ORU^R01 it receives (ER7 text)."""

    port: int = field(default_factory=free_port)
    #: MSA-1 of the answer; None: close without answering (the sender sees no ACK).
    ack_code: str | None = "AA"
    ack_text: str = ""
    received: list[str] = field(default_factory=list)
    _server: MLLPServer | None = None

    def start(self) -> None:
        receiver = self

        class OruHandler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                er7 = self.incoming_message
                incoming = parse_message(er7, find_groups=True)  # raises when unreadable
                receiver.received.append(er7)
                if receiver.ack_code is None:
                    raise ConnectionAbortedError("told not to answer")  # server closes
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_3 = "TEST-RIS"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = f"A{len(receiver.received)}"
                ack.msh.msh_11 = "P"
                ack.msa.msa_1 = receiver.ack_code
                ack.msa.msa_2 = incoming.msh.msh_10.value
                if receiver.ack_text:
                    ack.msa.msa_3 = receiver.ack_text
                return "\x0b" + ack.to_er7() + "\x1c\x0d"

        self._server = MLLPServer(
            "127.0.0.1", self.port, {"ORU^R01^ORU_R01": (OruHandler,)}, timeout=10
        )
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def messages(self) -> list[Any]:
        """The received messages, parsed back with hl7apy (groups found)."""
        return [parse_message(m, find_groups=True) for m in self.received]


class _Http(ThreadingHTTPServer):
    daemon_threads = True


@dataclass
class _HttpReceiver:
    port: int = field(default_factory=free_port)
    #: Answer every request with this status (e.g. 503, 410) and the request body echoed
    #: back; None: judge it.
    force_status: int | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def judge(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if receiver.force_status is not None:
                    # The worst case for the sender's logs: an error page echoing the payload.
                    status, answer = receiver.force_status, {"echo": body.decode()}
                else:
                    status, answer = receiver.judge(self.headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Http(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _outcome(message: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": message[:500]}],
    }


@dataclass
class FhirServer(_HttpReceiver):
    """A FHIR endpoint that accepts transaction Bundles valid under the R4B models."""

    token: str = "test-token-0123456789"

    def judge(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            self.rejected.append("bad or missing bearer token")
            return 401, _outcome("bad or missing bearer token")
        if not (headers.get("Content-Type") or "").startswith("application/fhir+json"):
            return 415, _outcome("expected application/fhir+json")
        try:
            doc = json.loads(body)
            bundle = Bundle.model_validate(doc)
            if bundle.type != "transaction":
                raise ValueError(f"Bundle.type is {bundle.type}, not transaction")
            for entry in doc["entry"]:
                resource = entry["resource"]
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        except (ValueError, KeyError, ValidationError) as exc:
            self.rejected.append(str(exc))
            return 400, _outcome(str(exc))
        self.received.append(doc)
        return 200, {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {"response": {"status": "201 Created", "location": f"{e['request']['url']}/{i}"}}
                for i, e in enumerate(doc["entry"], start=1)
            ],
        }


@dataclass
class WebhookReceiver(_HttpReceiver):
    """Verifies the signature (replay-safe: timestamp tolerance, one copy per event id) and
    validates the document against the published JSON schema."""

    secret: str = "webhook-secret-0123456789"
    tolerance_s: float = 300
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0

    def judge(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            verify(
                self.secret,
                headers.get(TIMESTAMP_HEADER),
                headers.get(SIGNATURE_HEADER),
                body,
                time.time(),
                self.tolerance_s,
            )
        except SignatureError as exc:
            self.rejected.append(str(exc))
            return 401, {"error": str(exc)}
        doc = json.loads(body)
        try:
            jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
        except jsonschema.ValidationError as exc:
            self.rejected.append(exc.message)
            return 422, {"error": exc.message}
        if headers.get(EVENT_HEADER) != doc["event_id"]:
            return 400, {"error": "event id header and body differ"}
        if doc["event_id"] in self.seen:
            self.duplicates += 1
            return 200, {"duplicate": True}
        self.seen.add(doc["event_id"])
        self.received.append(doc)
        return 200, {"ok": True}


def write_sample(name: str, text: str, language: str) -> None:
    """Put ``text`` between the ``<!-- sample:NAME -->`` markers of docs/integration.md (the
    samples there are what the tests' receivers received, never typed by hand)."""
    path: Path = REPO / "docs" / "integration.md"
    doc = path.read_text()
    start, end = f"<!-- sample:{name} -->", f"<!-- /sample:{name} -->"
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n```{language}\n{text.rstrip()}\n```\n{end}{tail}")
