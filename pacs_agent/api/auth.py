"""Token authentication of the API and dashboard: two roles, read and admin.

Tokens come from the settings (``[api] read_tokens``, ``admin_tokens``), each as the token
itself or as ``sha256:<hex digest>``; only the digests are kept in memory. A presented token
is hashed and compared with every known digest in constant time (``hmac.compare_digest``).

With no token configured the API is open (every caller is admin), which is allowed only on a
loopback address, as the DICOM listener allows any caller only there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from pacs_agent.config import ApiSettings
from pacs_agent.net.scp import is_loopback


class Role(StrEnum):
    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: their role, and how the audit log names them (never the token)."""

    role: Role
    actor: str

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def hash_token(token: str) -> str:
    """The ``sha256:<hex>`` form of a token, to put in the settings instead of the token."""
    return "sha256:" + digest(token).hex()


def _stored_digest(value: str) -> bytes:
    if value.startswith("sha256:"):
        return bytes.fromhex(value.removeprefix("sha256:"))
    return digest(value)


def exposure_problem(settings: ApiSettings) -> str | None:
    """Why binding these settings would let anyone on the network in, or None."""
    if is_loopback(settings.host) or settings.read_tokens or settings.admin_tokens:
        return None
    return (
        f"api.host is {settings.host!r}, not loopback, and no token is configured: set "
        "api.read_tokens and/or api.admin_tokens (or PACS_AGENT_API__ADMIN_TOKENS)"
    )


class TokenBook:
    """The known token digests and their roles."""

    def __init__(self, settings: ApiSettings) -> None:
        self._digests: list[tuple[bytes, Role]] = [
            (_stored_digest(t.get_secret_value()), Role.READ) for t in settings.read_tokens
        ] + [(_stored_digest(t.get_secret_value()), Role.ADMIN) for t in settings.admin_tokens]
        #: Signs the CSRF tokens of the open (no token) mode; new with each process.
        self._open_secret = secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """No token configured: every caller is admin (loopback only, see exposure_problem)."""
        return not self._digests

    def principal(self, token: str | None) -> Principal | None:
        """The caller presenting ``token``, or None when it is unknown (or missing)."""
        if self.open:
            return Principal(Role.ADMIN, "api:local")
        if not token:
            return None
        presented = digest(token)
        found: Role | None = None
        for known, role in self._digests:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, known) and found != Role.ADMIN:
                found = role
        if found is None:
            return None
        return Principal(found, f"api:{found.value}:{presented.hex()[:12]}")

    def csrf_token(self, token: str | None) -> str:
        """The form token that goes with a session: derived from its token, so an attacker
        who cannot read the page cannot make it, and every API process agrees on it."""
        key = digest(token) if token else self._open_secret
        return hmac.new(key, b"pacs-agent csrf", hashlib.sha256).hexdigest()

    def csrf_ok(self, token: str | None, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(token), presented or "")
