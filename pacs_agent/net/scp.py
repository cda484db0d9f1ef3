"""The DICOM listener: C-ECHO and C-STORE SCP.

The association protocol is pacs_agent.net.upperlayer (pynetdicom negotiates; the data
transfer loop is ours, see decision record 0009); this module holds the policies and what a
C-STORE does: store, index and answer with a DICOM status. Heavy work never runs on the
association thread. Invariant 1: success is answered only after the instance's bytes are
durable and its index row is committed; storage or database failure answers 0xA700,
undecodable data 0xC210, a dataset that does not fit the request 0xA900.

Association control happens before negotiation: a calling AE title that
is not on the allow-list, or calls from an address it is not pinned to, is rejected with
A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE title not recognised).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import cast

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import AllowedCaller, ListenerSettings, Settings
from pacs_agent.db.index import (
    Arrival,
    DigestLookup,
    DuplicatePolicy,
    IndexTimeout,
    IndexWriter,
    RowWriter,
    StoredFile,
    WriterBusy,
    decide_arrival,
    index_copy,
    index_instance,
    mark_released,
)
from pacs_agent.db.models import utcnow
from pacs_agent.dicom.header import InstanceHeader, instance_header
from pacs_agent.dicom.structure import (
    UnsupportedEncoding,
    check_complete,
    file_meta_end,
    header_values,
    part10_prefix,
)
from pacs_agent.net.upperlayer import (
    Association,
    AssociationInfo,
    Identity,
    Limits,
    Rejection,
    Server,
    StoreRequest,
)
from pacs_agent.storage.spool import InvalidUID, Spool, check_uid

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03


class ListenerRefused(RuntimeError):
    """The listener will not start with these settings; the message says why."""


def is_loopback(host: str) -> bool:
    """True for a loopback address (or ``localhost``); a name or ``0.0.0.0`` is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: ListenerSettings) -> str | None:
    """Why binding these settings would let any caller in from the network, or None."""
    if is_loopback(settings.host) or settings.allowed_callers or settings.allow_any_caller:
        return None
    return (
        f"listener.host is {settings.host!r}, not loopback, and listener.allowed_callers is "
        "empty: set allowed_callers, or listener.allow_any_caller = true to accept any caller"
    )


def caller_allowed(calling_ae: str, address: str, allowed: Sequence[AllowedCaller]) -> bool:
    """Pure: may ``calling_ae`` associate from ``address``? An empty list allows anyone."""
    if not allowed:
        return True
    title = calling_ae.strip()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    for caller in allowed:
        if caller.ae_title != title:
            continue
        if not caller.hosts:
            return True
        if ip is not None and any(
            ip in ipaddress.ip_network(h, strict=False) for h in caller.hosts
        ):
            return True
    return False


def _status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def receiver_for(settings: Settings, session_factory: sessionmaker[Session]) -> Receiver:
    """The Receiver ``serve`` runs: spool, index and the policies of ``settings``."""
    return Receiver(
        Spool(settings.spool_dir),
        session_factory,
        duplicates=DuplicatePolicy(settings.listener.duplicates),
        reopen_complete=settings.assembler.late_instance == "reprocess",
    )


@dataclass
class Receiver:
    """The listener's collaborators and policies, handed to each association (no globals)."""

    spool: Spool
    session_factory: sessionmaker[Session]
    clock: Callable[[], datetime] = utcnow
    duplicates: DuplicatePolicy = DuplicatePolicy.REPLACE
    #: ``assembler.late_instance == "reprocess"``: an instance for a complete study re-opens it.
    reopen_complete: bool = True
    #: Group commit of index rows; started by ``start_listener`` when not given (a listener
    #: process of several gets the shared one, ``pacs_agent.db.shared_index``).
    writer: RowWriter | None = None

    def index(self, header: InstanceHeader, stored: StoredFile) -> None:
        """Commit the index row of a durable instance (batched with concurrent instances
        by the writer when there is one)."""
        if self.writer is not None and _STORING.alone():
            self.writer.index_here(header, stored, self.clock(), reopen=self.reopen_complete)
        elif self.writer is not None:
            self.writer.index(header, stored, self.clock(), reopen=self.reopen_complete)
        else:
            index_instance(
                self.session_factory, header, stored, self.clock(), reopen=self.reopen_complete
            )


def read_header(data: bytes, transfer_syntax: UID) -> InstanceHeader:
    """The index's header of a Part-10 byte string, after checking it is complete.

    The element walker reads the few attributes the index needs straight from the bytes; only
    a deflated data set or an unusual character set goes through pydicom (slower). Raises
    Truncated, InvalidUID, or pydicom's errors for data that cannot be decoded.
    """
    offset = file_meta_end(data)
    return dataset_header(data[:offset], data, offset, transfer_syntax)


def dataset_header(
    prefix: bytes, data: bytes | bytearray | memoryview, offset: int, transfer_syntax: UID
) -> InstanceHeader:
    """The index's header of the data set that starts at ``offset`` of ``data``; ``prefix``
    is its Part-10 preamble and file meta (for pydicom, when the walker cannot read it)."""
    try:
        values = header_values(data, offset, transfer_syntax)
    except UnsupportedEncoding:
        check_complete(data, offset, transfer_syntax)
        whole = bytes(data) if offset else prefix + bytes(data)
        return instance_header(dcmread(BytesIO(whole), stop_before_pixels=True))
    # instance_header reads its source with ``.get(keyword)`` only: a dict of texts will do.
    return instance_header(cast(Dataset, values))


Refusal = tuple[int, str]


def _decode(request: StoreRequest, prefix: bytes) -> InstanceHeader | Refusal:
    """The header of a received data set, or the refusal (status, comment)."""
    try:
        header = dataset_header(prefix, request.dataset, 0, request.transfer_syntax)
    except InvalidUID as exc:
        log.warning("C-STORE refused 0xA900: %s (request SOP %s)", exc, request.sop_instance_uid)
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)
    except Exception as exc:
        log.warning("C-STORE refused 0xC210: cannot decode (%s: %s)", type(exc).__name__, exc)
        return CANNOT_UNDERSTAND, f"cannot decode dataset: {type(exc).__name__}"
    if header.sop_instance_uid != request.sop_instance_uid:
        return (
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPInstanceUID differs from Affected SOP Instance UID",
        )
    if header.sop_class_uid != request.sop_class_uid:
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from Affected SOP Class UID"
    return header


class ListenerService:
    """What the listener does with each association (pacs_agent.net.upperlayer.Service)."""

    def __init__(
        self,
        settings: ListenerSettings,
        receiver: Receiver,
        on_association: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.receiver = receiver
        self.on_association = on_association

    def association_result(self, accepted: bool) -> None:
        if self.on_association is not None:
            self.on_association(accepted)

    def check(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        if caller_allowed(calling_ae, address, self.settings.allowed_callers):
            return None
        return Rejection(
            REJECTED_PERMANENT,
            SOURCE_SERVICE_USER,
            CALLING_AE_NOT_RECOGNISED,
            f"calling AE {calling_ae!r} is not allowed (calling AE title not recognised)",
        )

    def store(self, assoc: AssociationInfo, request: StoreRequest) -> tuple[int, str | None]:
        return store_instance(self.receiver, assoc, request)

    def released(self, assoc: AssociationInfo) -> None:
        """The studies the association carried may now complete after the idle time."""
        studies = _studies(assoc)
        _lookup(self.receiver, assoc).close()
        try:
            mark_released(self.receiver.session_factory, studies, self.receiver.clock())
        except Exception:
            log.exception("could not record association release for %d studies", len(studies))

    def aborted(self, assoc: AssociationInfo) -> None:
        """Its studies complete by the unreleased timeout."""
        _lookup(self.receiver, assoc).close()


def _studies(assoc: AssociationInfo) -> set[str]:
    return cast(set[str], assoc.scratch.setdefault("studies", set()))


def _indexed_digest(receiver: Receiver, assoc: AssociationInfo, sop_uid: str) -> str | None:
    """The digest of the indexed instance ``sop_uid`` (None: not indexed). A C-STORE alone
    reads it on the idle index writer's connection (its cache is current); others on the
    association's own read-only connection."""
    if receiver.writer is not None and _STORING.alone():
        with contextlib.suppress(WriterBusy):
            return receiver.writer.digest_here(sop_uid)
    return _lookup(receiver, assoc).digest(sop_uid)


def _lookup(receiver: Receiver, assoc: AssociationInfo) -> DigestLookup:
    found = assoc.scratch.get("lookup")
    if found is None:
        found = assoc.scratch["lookup"] = DigestLookup(receiver.session_factory)
    return cast(DigestLookup, found)


def store_instance(
    receiver: Receiver, assoc: AssociationInfo, request: StoreRequest
) -> tuple[int, str | None]:
    """C-STORE: write the bytes durably, index them, then answer success."""
    with _STORING:
        return _store_instance(receiver, assoc, request)


def _store_instance(
    receiver: Receiver, assoc: AssociationInfo, request: StoreRequest
) -> tuple[int, str | None]:
    try:
        check_uid("Affected SOP Class UID", request.sop_class_uid)
        check_uid("Affected SOP Instance UID", request.sop_instance_uid)
    except InvalidUID as exc:
        log.warning("C-STORE refused 0xA900: %s", exc)
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)
    prefix = part10_prefix(
        request.sop_class_uid,
        request.sop_instance_uid,
        str(request.transfer_syntax),
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    decoded = _decode(request, prefix)
    if isinstance(decoded, tuple):
        return decoded
    header = decoded
    data = (prefix, request.dataset)
    try:
        indexed = _indexed_digest(receiver, assoc, header.sop_instance_uid)
    except Exception as exc:
        log.error("C-STORE 0xA700: index unavailable: %s", type(exc).__name__)
        return OUT_OF_RESOURCES, f"index failed: {type(exc).__name__}"
    if indexed is None and _STORING.alone():
        # A new instance (the usual case) and no other C-STORE under way: its checksum is
        # computed on another thread while this one writes and flushes the file (hashlib
        # lets go of the GIL). With other associations storing, the cores are busy with them
        # and the hand-over to the other thread costs more than it saves: computed here.
        hashing = _HASHER.submit(_sha256, prefix, request.dataset)
        try:
            return _put(receiver, assoc, request, header, data, Arrival.NEW, hashing.result)
        finally:
            hashing.result()  # the data set's buffer must not be reused while it is read
    digest = _sha256(prefix, request.dataset)
    if indexed is None:
        return _put(receiver, assoc, request, header, data, Arrival.NEW, lambda: digest)
    arrival = decide_arrival(indexed, digest, receiver.duplicates)
    if arrival in (Arrival.SAME, Arrival.KEEP_FIRST):
        if arrival is Arrival.KEEP_FIRST:
            log.warning(
                "C-STORE: SOP %s received again with other bytes; kept the first copy",
                header.sop_instance_uid,
            )
        _studies(assoc).add(header.study_instance_uid)
        return SUCCESS, None
    return _put(receiver, assoc, request, header, data, arrival, lambda: digest)


def _sha256(prefix: bytes, dataset: memoryview) -> str:
    sha = hashlib.sha256(prefix)
    sha.update(dataset)
    return sha.hexdigest()


#: Checksums of new instances, computed beside the file write (see store_instance).
_HASHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")


class _InFlight:
    """How many C-STOREs are being stored at this moment, across associations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._count -= 1

    def alone(self) -> bool:
        return self._count <= 1


_STORING = _InFlight()


def _put(
    receiver: Receiver,
    assoc: AssociationInfo,
    request: StoreRequest,
    header: InstanceHeader,
    data: tuple[bytes, memoryview],
    arrival: Arrival,
    digest_of: Callable[[], str],
) -> tuple[int, str | None]:
    """Write the instance durably where ``arrival`` says, then index it."""
    uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    if arrival is Arrival.KEEP_BOTH:
        relative = receiver.spool.copy_path(*uids, digest_of())
    else:
        relative = receiver.spool.relative_path(*uids)
    try:
        # The file and its directory entry are durable before the index row commits (the
        # directory's flush shared with the associations writing beside this one).
        receiver.spool.store(relative, data)
    except OSError as exc:
        log.error(
            "C-STORE 0xA700: spool write failed for SOP %s: %s",
            header.sop_instance_uid,
            exc.strerror or exc,
        )
        return OUT_OF_RESOURCES, f"storage failed: {exc.strerror or 'I/O error'}"

    stored = StoredFile(
        relative_path=str(relative),
        size_bytes=len(data[0]) + len(request.dataset),
        sha256=digest_of(),
        transfer_syntax_uid=str(request.transfer_syntax),
        calling_ae_title=assoc.calling_ae or None,
    )
    try:
        if arrival is Arrival.KEEP_BOTH:
            index_copy(receiver.session_factory, header.sop_instance_uid, stored, receiver.clock())
        else:
            receiver.index(header, stored)
    except Exception as exc:
        log.error(
            "C-STORE 0xA700: index failed for SOP %s: %s: %s",
            header.sop_instance_uid,
            type(exc).__name__,
            exc,
        )
        # An unindexed new file must not join its series, but a file that a committed row
        # names (the same instance stored by another association meanwhile, or this row
        # committed after all) must stay: discard only what surely has no row.
        if arrival is not Arrival.REPLACE and _surely_unindexed(receiver, assoc, header, exc):
            receiver.spool.discard(relative)
        return OUT_OF_RESOURCES, f"index failed: {type(exc).__name__}"
    _studies(assoc).add(header.study_instance_uid)
    if arrival is not Arrival.NEW:
        log.info(
            "C-STORE %s: study %s SOP %s",
            arrival.value,
            header.study_instance_uid,
            header.sop_instance_uid,
        )
    return SUCCESS, None


def _surely_unindexed(
    receiver: Receiver, assoc: AssociationInfo, header: InstanceHeader, exc: Exception
) -> bool:
    """After a failed index write: is it certain that no row names this instance's file?"""
    if isinstance(exc, IndexTimeout) and not exc.cancelled:
        return False  # the writer has the row in hand; it may still commit
    try:
        return _lookup(receiver, assoc).digest(header.sop_instance_uid) is None
    except Exception:
        return False  # cannot tell: an unindexed file is harmless, a lost one is not


def build_ae(settings: ListenerSettings) -> AE:
    """The listener's presentation contexts (and limits), as a pynetdicom AE: the source of
    what the upper layer negotiates and of docs/conformance.md's tables."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def tls_context(settings: ListenerSettings) -> ssl.SSLContext | None:
    """The server TLS context, or None when ``tls_certificate`` is unset.

    TLS 1.2 at least; with ``tls_client_ca`` a client certificate signed by it is required.
    Raises ListenerRefused when a file cannot be loaded.
    """
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
        if settings.tls_client_ca is not None:
            ctx.load_verify_locations(cafile=settings.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ListenerRefused(f"cannot load the listener's TLS files: {exc}") from exc
    return ctx


def start_listener(
    settings: ListenerSettings,
    receiver: Receiver,
    on_association: Callable[[bool], None] | None = None,
    *,
    sock: socket.socket | None = None,
) -> RunningListener:
    """Start the SCP in background threads; returns the server (call ``shutdown()``).
    ``on_association(accepted)`` is told of each answered A-ASSOCIATE-RQ (metrics).

    ``sock``: a listening socket shared with other listener processes (``serve`` with
    ``listener.processes`` > 1): accepted from instead of binding ``host:port``, and
    ``.incoming`` is left as it is (the parent cleared it before starting the processes;
    the others' files are in use). Raises ListenerRefused when the settings would expose it
    to any caller on the network.
    """
    problem = exposure_problem(settings)
    if problem is not None:
        raise ListenerRefused(problem)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # no identifier datasets in logs
    supported = build_ae(settings).supported_contexts
    identity = Identity(
        settings.ae_title, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    )
    limits = Limits(
        settings.max_pdu,
        settings.acse_timeout_s,
        settings.dimse_timeout_s,
        settings.network_timeout_s,
        spill_dir=receiver.spool.incoming_dir(),
        spill_bytes=settings.memory_per_instance_mb * 1024 * 1024,
        max_dataset_bytes=settings.max_instance_mb * 1024 * 1024,
    )
    tls = tls_context(settings)
    service = ListenerService(settings, receiver, on_association)

    def association(sock: socket.socket, address: str, slots: threading.Semaphore) -> Association:
        return Association(sock, address, service, supported, identity, limits, slots, tls)

    server = Server(settings.host, settings.port, association, settings.max_associations, sock)
    left = receiver.spool.clear_incoming() if sock is None else 0
    if left:
        log.warning("removed %d half-received files left by a stopped listener", left)
    receiver.spool.make_files_ahead()
    if receiver.writer is None:
        receiver.writer = IndexWriter(receiver.session_factory)
    server.start()
    log.info(
        "listening as %s on %s:%d%s",
        settings.ae_title,
        settings.host,
        settings.port,
        " (TLS)" if settings.tls_certificate else "",
    )
    return RunningListener(server, receiver)


@dataclass
class RunningListener:
    """A started listener: ``shutdown()`` stops accepting, ends the open associations, then
    flushes the index writer."""

    server: Server
    receiver: Receiver

    def shutdown(self) -> None:
        self.server.shutdown()
        if self.receiver.writer is not None:
            self.receiver.writer.close()
            self.receiver.writer = None
        self.receiver.spool.close()
