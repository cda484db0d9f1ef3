"""C-STORE SCU: send result objects to a DICOM peer, with TCP_NODELAY set (FACTS: Nagle).

Optionally over DICOM TLS (PS3.15 B.1): the caller passes an ``ssl.SSLContext``, made by
:func:`client_tls_context`.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


class AssociationFailed(ConnectionError):
    """The peer could not be reached or rejected the association."""


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    sop_instance_uid: str
    status: int | None  # None: no response (the association dropped)
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and (
            self.status == 0 or self.status in (0xB000, 0xB007, 0xB006)
        )


def client_tls_context(
    *,
    ca_file: Path | None = None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A TLS client context: the peer's certificate is verified against ``ca_file`` (the
    system's CAs when None); ``certificate``/``private_key`` give a client certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.check_hostname = check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate is not None:
        context.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    return context


def set_nodelay(assoc: Any) -> None:
    """pynetdicom never sets TCP_NODELAY; without it each C-STORE waits ~40 ms (Nagle)."""
    sock = assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def store_files(
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    paths: Sequence[Path],
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[StoreOutcome]:
    """Send ``paths`` over one association; one outcome per file, in order.

    With ``tls`` the association runs over TLS (the server name checked is ``host``).
    Raises AssociationFailed when no association can be made (refused, rejected, TLS
    handshake failed).
    """
    datasets: list[tuple[Path, Dataset]] = [(p, dcmread(p)) for p in paths]
    ae = _ae(calling_ae, timeout_s)
    seen: set[tuple[str, str]] = set()
    for _, ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key in seen:
            continue
        seen.add(key)
        syntaxes = [key[1]] + [
            t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != key[1]
        ]
        ae.add_requested_context(key[0], syntaxes)
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "connection failed or aborted"
        raise AssociationFailed(
            f"no association with {called_ae}@{host}:{port}{' (TLS)' if tls else ''}: {why}"
        )
    outcomes: list[StoreOutcome] = []
    try:
        set_nodelay(assoc)
        for path, ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                outcomes.append(StoreOutcome(path, uid, None, "association dropped"))
                continue
            rsp = assoc.send_c_store(ds)
            status = int(rsp.Status) if "Status" in rsp else None
            error = None if status is not None else "no response from peer"
            if status is not None and status not in (0, 0xB000, 0xB006, 0xB007):
                error = str(rsp.get("ErrorComment", "")) or f"status 0x{status:04X}"
            outcomes.append(StoreOutcome(path, uid, status, error))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def echo(
    *, host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float = 10.0
) -> int | None:
    """C-ECHO; the status, or None when no association could be made."""
    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()
