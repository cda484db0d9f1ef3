"""How a delivery attempt ends badly: the receiver refused it, or could not be reached."""

from __future__ import annotations


class Refused(Exception):
    """The receiver answered and refused the message (HL7 AE/AR, HTTP 4xx): sending the same
    message again will not help. ``response`` is its answer (ACK code, HTTP status)."""

    def __init__(self, message: str, response: str | None = None) -> None:
        super().__init__(message)
        self.response = response


class Unreachable(ConnectionError):
    """No usable answer (connection refused or dropped, time-out, no ACK, HTTP 5xx): the
    notification is tried again later."""

    def __init__(self, message: str, response: str | None = None) -> None:
        super().__init__(message)
        self.response = response
