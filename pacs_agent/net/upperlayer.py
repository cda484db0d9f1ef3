"""The listener's DICOM upper layer (PS3.8) and DIMSE command sets (PS3.7), acceptor side.

One thread per association reads PDUs with blocking reads straight into buffers, gathers the
P-DATA fragments of a message into one buffer and hands complete C-STORE and C-ECHO requests
to a ``Service``. pynetdicom still decodes and negotiates the association (A-ASSOCIATE-RQ
PDU, presentation contexts, role selection, A-ASSOCIATE-AC PDU); only the data transfer
phase, where every received instance spends its time, is this module's. Why: decision record
0009 (pynetdicom's event loop and per-fragment objects cost about 3 ms per 512 KB instance,
more than storing it durably).

The state machine is the acceptor's part of PS3.8 9.2: Sta2 (waiting for A-ASSOCIATE-RQ,
``acse_timeout_s``), Sta6 (established; ``network_timeout_s`` while idle between
messages, ``dimse_timeout_s`` for each PDU of a message that has started), Sta13 (closing). Anything
unexpected gets an A-ABORT and the connection is closed.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ_PDU = 0x01
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

# A-ABORT sources and reasons (PS3.8 9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
# DIMSE statuses of the upper layer itself (PS3.7 C.4, C.5)
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
UNRECOGNIZED_OPERATION = 0x0211

_HEADER = struct.Struct(">BxI")
_PDV = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")
_MAX_COMMAND = 64 * 1024
# max_pdu = 0 ("no limit") still refuses a PDU that would need an absurd buffer.
_UNLIMITED_PDU = 256 * 1024 * 1024
_INITIAL_BUFFER = 1024 * 1024
_FIRST_PDU_BUFFER = 64 * 1024
# Connections beyond max_associations that may wait for their A-ASSOCIATE-RQ (or be rejected).
_EXTRA_CONNECTIONS = 16
# A buffer grown past this for one large instance is given back after it.
_KEEP_BUFFER = 64 * 1024 * 1024


class _Buffer:
    """A byte buffer kept for the whole association, so receiving an instance allocates
    (and page-faults in) nothing new: fragments are copied in at ``length``."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.length = 0

    def reset(self, need: int) -> None:
        """Empty it, with room for ``need`` bytes (and not much more than needed later)."""
        self.length = 0
        if need > len(self.data) or len(self.data) > max(_KEEP_BUFFER, need):
            self.data = bytearray(max(need, _INITIAL_BUFFER))

    def append(self, chunk: memoryview) -> None:
        end = self.length + len(chunk)
        if end > len(self.data):  # a new buffer: views handed out of the old one stay valid
            grown = bytearray(max(end, 2 * len(self.data)))
            grown[: self.length] = self.data[: self.length]
            self.data = grown
        self.data[self.length : end] = chunk
        self.length = end

    def view(self, length: int) -> memoryview:
        return memoryview(self.data)[:length]


def _write_all(file: BinaryIO, data: memoryview) -> None:
    """An unbuffered file's write may be short: write until all of ``data`` is out."""
    while data:
        written = file.write(data)
        data = data[written:]


class _DataSetBuffer(_Buffer):
    """The data set being gathered: in memory up to ``spill_bytes``, beyond that in an
    anonymous temporary file in ``spill_dir`` (gone when closed, even after a crash), handed
    out as a memory map. A multi-gigabyte instance then costs page cache, not the
    listener's memory, however many associations carry one at once. Past ``limit_bytes``
    (0: no limit) nothing more is kept: the data set is refused when its message ends."""

    def __init__(
        self, size: int, spill_dir: Path | None, spill_bytes: int, limit_bytes: int = 0
    ) -> None:
        super().__init__(size)
        self.spill_dir = spill_dir
        self.spill_bytes = spill_bytes
        self.limit_bytes = limit_bytes
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None
        #: Writing the temporary file failed: the data set is lost, its C-STORE fails.
        self.error: OSError | None = None
        #: Larger than ``limit_bytes``: what came is discarded, its C-STORE fails.
        self.too_large = False

    @property
    def spilled(self) -> bool:
        return self._file is not None or self.error is not None

    def append(self, chunk: memoryview) -> None:
        if self.too_large or (self.limit_bytes and self.length + len(chunk) > self.limit_bytes):
            if not self.too_large:  # memory and disk back now, not when the message ends
                self.too_large = True
                self._close_file()
                self.data = bytearray()
            self.length += len(chunk)
            return
        if not self.spilled and (
            self.spill_dir is None or self.length + len(chunk) <= self.spill_bytes
        ):
            super().append(chunk)
            return
        if self.error is None:
            try:
                if self._file is None:
                    assert self.spill_dir is not None
                    # closed by reset(), at the end of every message and association
                    self._file = tempfile.TemporaryFile(  # noqa: SIM115
                        dir=self.spill_dir, buffering=0
                    )
                    _write_all(self._file, memoryview(self.data)[: self.length])
                _write_all(self._file, chunk)
            except OSError as exc:  # a full disk: the C-STORE is answered 0xA700
                self.error = exc
                # Give the space back now, not when the message ends (a peer may send on
                # for long, and other associations need the disk meanwhile).
                self._close_file()
        self.length += len(chunk)

    def failure(self) -> tuple[str, str] | None:
        """Why the data set gathered so far cannot be stored, for the log and for the
        peer's Error Comment (at most 64 characters); None: it can be."""
        if self.too_large:
            limit = f"{self.limit_bytes / 2**20:g} MiB"
            return (
                f"data set of {self.length / 2**20:.1f} MiB exceeds the limit of {limit} "
                "(listener.max_instance_mb); its bytes were discarded",
                f"data set over {limit} (listener.max_instance_mb)",
            )
        if self.error is not None:
            reason = self.error.strerror or "I/O error"
            return f"spilling the data set failed: {reason}", f"storage failed: {reason}"
        return None

    def view(self, length: int) -> memoryview:
        if self._file is None:
            return super().view(length)
        self._file.flush()
        if length == 0:
            return memoryview(b"")
        self._map = mmap.mmap(self._file.fileno(), length, access=mmap.ACCESS_READ)
        return memoryview(self._map)[:length]

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def reset(self, need: int) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the GC closes it
                self._map.close()
            self._map = None
        self._close_file()
        self.error = None
        self.too_large = False
        super().reset(need)


class ProtocolError(Exception):
    """The peer broke PS3.8/PS3.7: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerAborted(Exception):
    """The peer sent A-ABORT or closed the connection."""


class Released(Exception):
    """The peer released the association (A-RELEASE-RQ answered)."""


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ parameters (PS3.8 9.3.4) and the log line saying why."""

    result: int
    source: int
    reason: int
    why: str


@dataclass(frozen=True)
class StoreRequest:
    """A complete C-STORE request: its command and the data set bytes as received."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    #: The data set's bytes: a view of the association's buffer, valid during the call only.
    dataset: memoryview


class Service(Protocol):
    """What the listener does with an association; called on its thread."""

    def check(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        """Accept (None) or reject an A-ASSOCIATE-RQ before negotiation."""

    def store(self, assoc: AssociationInfo, request: StoreRequest) -> tuple[int, str | None]:
        """Handle one C-STORE; returns (status, error comment)."""

    def association_result(self, accepted: bool) -> None:
        """An A-ASSOCIATE-RQ was answered: accepted (True) or rejected (False); for metrics."""

    def released(self, assoc: AssociationInfo) -> None:
        """The association ended with A-RELEASE."""

    def aborted(self, assoc: AssociationInfo) -> None:
        """The association ended any other way (A-ABORT, closed, timed out)."""


@dataclass
class AssociationInfo:
    """One association's identity, as handed to the Service."""

    calling_ae: str
    called_ae: str
    address: str
    #: C-STOREs answered success / with another status, for the log line at its end.
    stored: int = 0
    refused: int = 0
    #: Free for the Service (the studies this association touched, for example).
    scratch: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.calling_ae!r} from {self.address}: {self.stored} stored, {self.refused} refused"
        )


@dataclass(frozen=True)
class Limits:
    max_pdu: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    #: Data sets larger than ``spill_bytes`` are gathered in a temporary file in ``spill_dir``
    #: (None: always in memory).
    spill_dir: Path | None = None
    spill_bytes: int = 64 * 1024 * 1024
    #: A data set larger than this is refused 0xA700 when its message ends (0: no limit).
    max_dataset_bytes: int = 0


@dataclass(frozen=True)
class Identity:
    """What the A-ASSOCIATE-AC says about us (PS3.7 D.3.3.2)."""

    ae_title: str
    implementation_class_uid: str
    implementation_version: str


# ---------------------------------------------------------------------------------------------
# Encoding (all fixed layouts of PS3.8 9.3 and PS3.7 E.1)


def abort_pdu(source: int = ABORT_SOURCE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return struct.pack(">BxIxxBB", A_ABORT_PDU, 4, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BxIxBBB", 0x03, 4, result, source, reason)


def release_rp_pdu() -> bytes:
    return struct.pack(">BxIxxxx", A_RELEASE_RP_PDU, 4)


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, tag, len(value)) + value


def response_command(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    status: int,
    sop_instance_uid: str | None = None,
    comment: str | None = None,
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set, implicit VR little endian, tags ascending."""
    body = _element(0x0002, _uid_value(sop_class_uid))
    body += _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0120, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if comment:
        text = comment[:64].encode("ascii", "replace")
        body += _element(0x0902, text + b" " if len(text) % 2 else text)
    if sop_instance_uid is not None:
        body += _element(0x1000, _uid_value(sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def command_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``command`` (fragmented to the peer's maximum PDU length)."""
    room = len(command) if peer_max_pdu == 0 else max(peer_max_pdu - 6, 1)
    out = bytearray()
    for start in range(0, len(command), room):
        chunk = command[start : start + room]
        last = start + room >= len(command)
        out += _HEADER.pack(P_DATA_TF_PDU, len(chunk) + 6)
        out += _PDV.pack(len(chunk) + 2, context_id, 0x03 if last else 0x01)
        out += chunk
    return bytes(out)


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set (group 0000, implicit VR little endian) by element
    number. Raises ProtocolError for anything that is not one."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ProtocolError("command set holds a non-command element or is truncated")
        values[element] = bytes(data[pos : pos + length])
        pos += length
    return values


def _us(values: dict[int, bytes], element: int) -> int | None:
    raw = values.get(element)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def _text(values: dict[int, bytes], element: int) -> str:
    return values.get(element, b"").decode("ascii", "replace").rstrip(" \x00")


# ---------------------------------------------------------------------------------------------
# Negotiation (through pynetdicom's PDU classes and presentation-context negotiation)


def accept_pdu(
    request: A_ASSOCIATE,
    accepted: list[PresentationContext],
    roles: list[SCP_SCU_RoleSelectionNegotiation],
    identity: Identity,
    max_pdu: int,
) -> bytes:
    """The A-ASSOCIATE-AC PDU for ``request`` with ``accepted`` (results of negotiation)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = accepted
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(identity.implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = identity.implementation_version
    user_information: list[object] = [length, class_uid, version, *roles]
    items = request.user_information
    if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in items):
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        user_information.append(window)
    primitive.user_information = user_information  # type: ignore[assignment]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def negotiate(
    request: A_ASSOCIATE, supported: Sequence[PresentationContext]
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """pynetdicom's acceptor negotiation of the requested presentation contexts."""
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in request.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    results, role_items = negotiate_as_acceptor(
        request.presentation_context_definition_list, list(supported), roles or None
    )
    return list(results), list(role_items)


def peer_max_pdu(request: A_ASSOCIATE) -> int:
    for item in request.user_information:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


# ---------------------------------------------------------------------------------------------
# The association


class Association:
    """One accepted TCP connection, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        service: Service,
        supported: Sequence[PresentationContext],
        identity: Identity,
        limits: Limits,
        slots: threading.Semaphore,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.address = address
        self.service = service
        self.supported = supported
        self.identity = identity
        self.limits = limits
        self.slots = slots
        self._holds_slot = False
        self.tls = tls
        self._header = bytearray(6)
        # Small until the association is accepted: a connection that never associates
        # costs little. Both grow to what the messages need and are kept for the association.
        self._pdu = _Buffer(_FIRST_PDU_BUFFER)  # the PDU being read
        # the data set being gathered (in a temporary file when large)
        self._dataset = _DataSetBuffer(
            0, limits.spill_dir, limits.spill_bytes, limits.max_dataset_bytes
        )
        self._contexts: dict[int, UID] = {}  # accepted context id -> transfer syntax
        self._abstract: dict[int, str] = {}
        self._peer_max_pdu = 0
        self._timeout_now: float | None = None
        self._send_timeout_set = False
        # Plain TCP: blocking reads with kernel timeouts, MSG_WAITALL (one recv per PDU, no
        # poll). TLS sockets take neither: Python's own timeouts there.
        self._kernel_timeouts = tls is None
        self._recv_flags = socket.MSG_WAITALL if tls is None else 0

    # -- reading -------------------------------------------------------------------------

    def _set_timeout(self, timeout: float) -> None:
        if timeout == self._timeout_now:
            return
        if self._kernel_timeouts:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        else:
            self.sock.settimeout(timeout)
        self._timeout_now = timeout

    def _recv_into(self, view: memoryview, timeout: float) -> None:
        """Fill ``view`` within ``timeout`` seconds in all: a peer that trickles a byte at a
        time still times out."""
        self._set_timeout(timeout)
        deadline = time.monotonic() + timeout
        got, need = 0, len(view)
        while got < need:
            try:
                n = self.sock.recv_into(view[got:], 0, self._recv_flags)
            except BlockingIOError as exc:  # the kernel timeout (SO_RCVTIMEO) expired
                raise TimeoutError("timed out") from exc
            if n == 0:
                raise PeerAborted("connection closed by the peer")
            got += n
            if got < need:  # a short read: only what is left of the deadline remains
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self._set_timeout(left)

    def _read_pdu(self, timeout: float) -> tuple[int, memoryview]:
        """The next PDU's type and body. The body is a view of a buffer that the next read
        reuses: use it before reading again."""
        self._recv_into(memoryview(self._header), timeout)
        pdu_type, length = _HEADER.unpack(self._header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            raise ProtocolError(f"unknown PDU type {pdu_type:#04x}", REASON_UNRECOGNIZED_PDU)
        limit = self.limits.max_pdu or _UNLIMITED_PDU
        if pdu_type == P_DATA_TF_PDU and length > limit + 6:
            raise ProtocolError(
                f"P-DATA-TF of {length} bytes exceeds the maximum PDU {limit}",
                REASON_INVALID_PARAMETER,
            )
        if pdu_type != P_DATA_TF_PDU and length > 1 << 20:
            raise ProtocolError(f"PDU type {pdu_type:#04x} of {length} bytes")
        self._pdu.reset(length)
        body = self._pdu.view(length)
        self._recv_into(body, timeout)
        return pdu_type, body

    def _send(self, data: bytes) -> None:
        if not self._kernel_timeouts:
            self._set_timeout(self.limits.network_timeout_s)
        elif not self._send_timeout_set:  # once: sends always wait up to network_timeout_s
            value = _timeval(self.limits.network_timeout_s)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self._send_timeout_set = True
        try:
            self.sock.sendall(data)
        except BlockingIOError as exc:  # the kernel timeout (SO_SNDTIMEO) expired
            raise TimeoutError("timed out sending") from exc

    # -- phases --------------------------------------------------------------------------

    def run(self) -> None:
        info: AssociationInfo | None = None
        try:
            if self.tls is not None:
                self.sock.settimeout(self.limits.acse_timeout_s)
                # Handshake after the assignment: wrap_socket detaches the plain socket, and
                # Server.shutdown must reach the socket that is in use.
                tls_sock = self.tls.wrap_socket(
                    self.sock, server_side=True, do_handshake_on_connect=False
                )
                self.sock = tls_sock
                tls_sock.do_handshake()
            info = self._establish()
            if info is None:
                return
            self._transfer(info)
        except Released:  # already recorded by _transfer, before the A-RELEASE-RP
            info = None
        except PeerAborted as exc:
            log.info("association ended (%s): %s", exc, _who(info, self.address))
        except TimeoutError:
            if info is None:  # ARTIM expired in Sta2: close, send nothing (PS3.8 AA-2)
                log.warning("connection from %s closed: not associated in time", self.address)
            else:
                log.warning("association aborted (timed out): %s", info.summary())
                self._abort(REASON_NOT_SPECIFIED)
        except ProtocolError as exc:
            log.warning("association aborted (%s): %s", exc, _who(info, self.address))
            self._abort(exc.reason)
        except (ssl.SSLError, OSError) as exc:
            log.warning("association failed (%s): %s", exc, _who(info, self.address))
        except Exception:  # a defect of ours: abort this association, keep the listener
            log.exception("association aborted by an error: %s", _who(info, self.address))
            self._abort(REASON_NOT_SPECIFIED)
        finally:
            self._leave()
            self._dataset.reset(0)  # a spilled data set's file goes now
            if info is not None:
                self.service.aborted(info)
            self._close()

    def _abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send(abort_pdu(ABORT_SOURCE_PROVIDER, reason))

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _establish(self) -> AssociationInfo | None:
        pdu_type, body = self._read_pdu(self.limits.acse_timeout_s)
        if pdu_type == A_ABORT_PDU:  # Sta2 + A-ABORT: just close (PS3.8 AA-2)
            raise PeerAborted("A-ABORT before association")
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(bytes(self._header) + bytes(body))
            request = pdu.to_primitive()
        except Exception as exc:
            raise ProtocolError(
                f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})", REASON_INVALID_PARAMETER
            ) from exc
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        rejection = self._rejection(request, calling, called)
        if rejection is not None:
            log.warning(
                "association rejected: calling AE %r from %s: %s (result %d, source %d, reason %d)",
                calling,
                self.address,
                rejection.why,
                rejection.result,
                rejection.source,
                rejection.reason,
            )
            self.service.association_result(False)
            self._send(reject_pdu(rejection.result, rejection.source, rejection.reason))
            self._linger()
            return None
        try:
            results, roles = negotiate(request, self.supported)
        except Exception as exc:  # e.g. a presentation context without a transfer syntax
            raise ProtocolError(
                f"presentation contexts cannot be negotiated ({type(exc).__name__})",
                REASON_INVALID_PARAMETER,
            ) from exc
        self._send(accept_pdu(request, results, roles, self.identity, self.limits.max_pdu))
        for cx in results:
            if cx.result == 0x00 and cx.context_id is not None:
                self._contexts[cx.context_id] = UID(cx.transfer_syntax[0])
                self._abstract[cx.context_id] = str(cx.abstract_syntax)
        self._peer_max_pdu = peer_max_pdu(request)
        accepted = sum(1 for cx in results if cx.result == 0x00)
        self.service.association_result(True)
        log.info(
            "association accepted: %r from %s (%d of %d presentation contexts)",
            calling,
            self.address,
            accepted,
            len(results),
        )
        return AssociationInfo(calling, called, self.address)

    def _rejection(self, request: A_ASSOCIATE, calling: str, called: str) -> Rejection | None:
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return Rejection(1, 1, 2, "application context name not supported")
        if called != self.identity.ae_title:
            return Rejection(1, 1, 7, f"called AE title {called!r} not recognised")
        rejection = self.service.check(calling, called, self.address)
        if rejection is not None:
            return rejection
        if not self.slots.acquire(blocking=False):
            return Rejection(2, 3, 2, "too many associations (local limit exceeded)")
        self._holds_slot = True
        return None

    def _leave(self) -> None:
        """Give the association's slot back (once)."""
        if self._holds_slot:
            self._holds_slot = False
            self.slots.release()

    def _linger(self) -> None:
        """After A-ASSOCIATE-RJ or A-RELEASE-RP: let the peer close first (PS3.8 Sta13),
        for 2 seconds at most in all."""
        deadline = time.monotonic() + min(self.limits.acse_timeout_s, 2.0)
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    return
        except OSError:
            pass

    def _transfer(self, info: AssociationInfo) -> None:
        command = bytearray()
        dataset = self._dataset
        command_done = False
        context_id = -1
        while True:
            # Between messages the peer may idle up to network_timeout_s; inside a message
            # (after its first fragment) each PDU must follow within dimse_timeout_s.
            in_message = context_id != -1
            pdu_type, body = self._read_pdu(
                self.limits.dimse_timeout_s if in_message else self.limits.network_timeout_s
            )
            if pdu_type == A_RELEASE_RQ_PDU:
                if context_id != -1:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                # Recorded before the A-RELEASE-RP goes out: once the peer sees its release
                # complete, the release is in the index (the completeness timer runs from it).
                log.info("association released: %s", info.summary())
                self.service.released(info)
                # The slot is free before the peer can see the release complete: a sender
                # that opens its next association at once must not find it still taken.
                self._leave()
                self._send(release_rp_pdu())
                self._linger()
                raise Released()
            if pdu_type == A_ABORT_PDU:
                raise PeerAborted("A-ABORT from the peer")
            if pdu_type != P_DATA_TF_PDU:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#04x} while established")
            view = body
            pos, end = 0, len(body)
            while pos < end:
                if pos + 6 > end:
                    raise ProtocolError("PDV item header truncated", REASON_INVALID_PARAMETER)
                item_length, pcid, control = _PDV.unpack_from(body, pos)
                if item_length < 2 or pos + 4 + item_length > end:
                    raise ProtocolError(
                        "PDV item length does not fit its PDU", REASON_INVALID_PARAMETER
                    )
                if pcid not in self._contexts:
                    raise ProtocolError(f"presentation context {pcid} was not accepted")
                fragment = view[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if context_id == -1:
                    context_id = pcid
                elif pcid != context_id:
                    raise ProtocolError("PDVs of one message on two presentation contexts")
                if control & 0x01:  # command fragment
                    if command_done or len(command) + len(fragment) > _MAX_COMMAND:
                        raise ProtocolError("unexpected command fragment")
                    command += fragment
                    if control & 0x02:
                        command_done = True
                        values = parse_command(command)
                        if _us(values, 0x0800) == NO_DATASET:
                            self._dispatch(info, context_id, values, None)
                            command, command_done, context_id = bytearray(), False, -1
                else:
                    if not command_done:
                        raise ProtocolError("data set fragment before its command")
                    dataset.append(fragment)
                    if control & 0x02:
                        values = parse_command(command)
                        whole = None
                        if dataset.failure() is None:
                            try:
                                whole = dataset.view(dataset.length)
                            except OSError as exc:  # flushing or mapping the spilled file
                                dataset.error = exc
                        if whole is None:
                            why = dataset.failure()
                            assert why is not None
                            log.error(
                                "C-STORE 0xA700 for SOP %s from %s: %s",
                                _text(values, 0x1000),
                                _who(info, self.address),
                                why[0],
                            )
                            failure = (OUT_OF_RESOURCES, why[1])
                            self._dispatch(info, context_id, values, memoryview(b""), failure)
                        else:
                            with whole:
                                self._dispatch(info, context_id, values, whole)
                        dataset.reset(0)
                        command = bytearray()
                        command_done, context_id = False, -1

    def _dispatch(
        self,
        info: AssociationInfo,
        context_id: int,
        values: dict[int, bytes],
        dataset: memoryview | None,
        failure: tuple[int, str] | None = None,
    ) -> None:
        command_field = _us(values, 0x0100)
        if command_field == C_CANCEL_RQ:
            return  # nothing of ours can be cancelled; no response is sent (PS3.7 9.3.2.3)
        message_id = _us(values, 0x0110)
        if message_id is None:
            raise ProtocolError("command without a Message ID")
        # Affected SOP Class UID; N-requests carry the Requested SOP Class UID instead.
        sop_class = _text(values, 0x0002) or _text(values, 0x0003)
        context_class = self._abstract[context_id]
        if command_field is None or command_field & 0x8000:
            raise ProtocolError(f"not a request: command field {command_field!r}")
        if command_field == C_STORE_RQ and dataset is None:
            raise ProtocolError("C-STORE-RQ without a data set")
        if command_field not in (C_ECHO_RQ, C_STORE_RQ):
            # C-FIND, N-ACTION and the like: not offered here (PS3.7 C.4: unrecognized op).
            log.warning("DIMSE command %#06x from %s refused 0x0211", command_field, info.address)
            rsp = response_command(
                command_field | 0x8000, message_id, sop_class, UNRECOGNIZED_OPERATION
            )
        elif sop_class != context_class:
            # PS3.7 9.1.1.1: the SOP class must be the presentation context's abstract syntax.
            log.warning(
                "C-STORE/C-ECHO of %s on a %s context from %s refused 0x0122",
                sop_class,
                context_class,
                info.address,
            )
            rsp = response_command(
                command_field | 0x8000,
                message_id,
                sop_class,
                SOP_CLASS_NOT_SUPPORTED,
                _text(values, 0x1000) if command_field == C_STORE_RQ else None,
                "SOP class differs from the presentation context",
            )
        elif command_field == C_ECHO_RQ:
            rsp = response_command(C_ECHO_RSP, message_id, sop_class, 0x0000)
        else:
            assert dataset is not None
            sop_instance = _text(values, 0x1000)
            request = StoreRequest(sop_class, sop_instance, self._contexts[context_id], dataset)
            status, comment = failure if failure else self.service.store(info, request)
            if status == 0x0000:
                info.stored += 1
            else:
                info.refused += 1
            rsp = response_command(
                C_STORE_RSP, message_id, sop_class, status, sop_instance, comment
            )
        self._send(command_pdus(context_id, rsp, self._peer_max_pdu))


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _who(info: AssociationInfo | None, address: str) -> str:
    return info.summary() if info is not None else f"connection from {address}"


class Server:
    """Accepts connections on one port and runs each association on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        make: Callable[[socket.socket, str, threading.Semaphore], Association],
        max_associations: int,
        sock: socket.socket | None = None,
    ) -> None:
        # ``sock``: a listening socket shared with other listener processes (pre-forked by
        # ``serve``). Its blocking accept hands each connection to the process that has
        # waited longest (the kernel wakes one waiter at a time, in turn). It is never shut
        # down here, which would stop it listening for every process that shares it: at
        # ``shutdown`` the accept thread is left blocked (a daemon; the process is ending)
        # and closes what it still accepts.
        self._shared = sock is not None
        self._listener = (
            sock if sock is not None else socket.create_server((host, port), backlog=64)
        )
        self._make = make
        self._slots = threading.Semaphore(max_associations)
        # Connections at once, associated or not: each costs a thread. Beyond this a new
        # connection is closed at once (before it can send an A-ASSOCIATE-RQ).
        self._max_connections = max_associations + _EXTRA_CONNECTIONS
        self._refused_logged = 0.0
        self._lock = threading.Lock()
        self._open: dict[threading.Thread, Association] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="dicom-accept", daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            if self._stopping.is_set():
                conn.close()  # shutting down (a shared socket's accept outlives shutdown)
                return
            with self._lock:
                full = len(self._open) >= self._max_connections
            if full:
                conn.close()
                if time.monotonic() - self._refused_logged > 10:
                    self._refused_logged = time.monotonic()
                    log.warning(
                        "connection from %s closed: %d connections open already",
                        peer[0],
                        self._max_connections,
                    )
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                association = self._make(conn, str(peer[0]), self._slots)
                thread = threading.Thread(
                    target=self._run, args=(association,), name=f"assoc-{peer[0]}:{peer[1]}"
                )
                with self._lock:
                    self._open[thread] = association
                thread.start()
            except Exception:  # one bad connection must never stop the listener accepting
                log.exception("could not start an association for %s", peer[0])
                with self._lock:
                    self._open = {t: a for t, a in self._open.items() if t.is_alive()}
                conn.close()

    def _run(self, association: Association) -> None:
        try:
            association.run()
        finally:
            with self._lock:
                self._open.pop(threading.current_thread(), None)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, abort the open associations and wait for their threads."""
        self._stopping.set()
        if not self._shared:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            if self._thread.is_alive():
                self._thread.join(timeout_s)
        with self._lock:
            open_now = dict(self._open)
        for association in open_now.values():
            with contextlib.suppress(OSError):
                # The TCP connection under TLS too (SSLSocket.shutdown drops its SSL state,
                # which the association's thread is using).
                socket.socket.shutdown(association.sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_s
        for thread in open_now:
            thread.join(max(deadline - time.monotonic(), 0.1))
