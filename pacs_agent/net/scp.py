"""The DICOM listener: C-ECHO and C-STORE SCP on pynetdicom.

Handlers are thin: they store, index and answer with a DICOM status. Heavy work never runs on
the association thread. Invariant 1: success is answered only after the instance's bytes are
durable and its index row is committed; storage or database failure answers 0xA700,
undecodable data 0xC210, a dataset that does not fit the request 0xA900.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import ListenerSettings
from pacs_agent.db.index import IndexOutcome, StoredFile, index_instance, mark_released
from pacs_agent.db.models import utcnow
from pacs_agent.dicom.header import instance_header
from pacs_agent.dicom.structure import check_complete, file_meta_end
from pacs_agent.storage.spool import InvalidUID, Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210


def _status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class Receiver:
    """The listener's collaborators, handed to each handler (no globals)."""

    spool: Spool
    session_factory: sessionmaker[Session]
    clock: Callable[[], datetime] = utcnow
    _studies_by_assoc: dict[int, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def touched(self, assoc: Any, study_uid: str) -> None:
        with self._lock:
            self._studies_by_assoc.setdefault(id(assoc), set()).add(study_uid)

    def take_studies(self, assoc: Any) -> set[str]:
        with self._lock:
            return self._studies_by_assoc.pop(id(assoc), set())


def handle_store(event: Any, receiver: Receiver) -> int | Dataset:
    """C-STORE: write the encoded bytes durably, index them, then answer success."""
    request = event.request
    try:
        data = event.encoded_dataset(include_meta=True)
        check_complete(data, file_meta_end(data), event.context.transfer_syntax)
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        header = instance_header(ds)
    except InvalidUID as exc:
        log.warning(
            "C-STORE refused 0xA900: %s (request SOP %s)", exc, request.AffectedSOPInstanceUID
        )
        return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except Exception as exc:
        log.warning("C-STORE refused 0xC210: cannot decode (%s: %s)", type(exc).__name__, exc)
        return _status(CANNOT_UNDERSTAND, f"cannot decode dataset: {type(exc).__name__}")

    if header.sop_instance_uid != request.AffectedSOPInstanceUID:
        return _status(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPInstanceUID differs from Affected SOP Instance UID",
        )
    if header.sop_class_uid != request.AffectedSOPClassUID:
        return _status(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from Affected SOP Class UID"
        )

    digest = hashlib.sha256(data).hexdigest()
    relative = receiver.spool.relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    try:
        receiver.spool.store(relative, data)
    except OSError as exc:
        log.error(
            "C-STORE 0xA700: spool write failed for SOP %s: %s",
            header.sop_instance_uid,
            exc.strerror or exc,
        )
        return _status(OUT_OF_RESOURCES, f"storage failed: {exc.strerror or 'I/O error'}")

    stored = StoredFile(
        relative_path=str(relative),
        size_bytes=len(data),
        sha256=digest,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling_ae_title=str(event.assoc.requestor.ae_title).strip() or None,
    )
    try:
        outcome = index_instance(receiver.session_factory, header, stored, receiver.clock())
    except Exception as exc:
        log.error(
            "C-STORE 0xA700: index failed for SOP %s: %s: %s",
            header.sop_instance_uid,
            type(exc).__name__,
            exc,
        )
        return _status(OUT_OF_RESOURCES, f"index failed: {type(exc).__name__}")
    receiver.touched(event.assoc, header.study_instance_uid)
    if outcome is not IndexOutcome.NEW:
        log.info(
            "C-STORE %s: study %s SOP %s",
            outcome.value,
            header.study_instance_uid,
            header.sop_instance_uid,
        )
    return SUCCESS


def handle_released(event: Any, receiver: Receiver) -> None:
    """Association released: the studies it carried may now complete after the idle time."""
    studies = receiver.take_studies(event.assoc)
    try:
        mark_released(receiver.session_factory, studies, receiver.clock())
    except Exception:
        log.exception("could not record association release for %d studies", len(studies))


def handle_aborted(event: Any, receiver: Receiver) -> None:
    """Aborted: forget the association; its studies complete by the unreleased timeout."""
    receiver.take_studies(event.assoc)


def build_ae(settings: ListenerSettings) -> AE:
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


def start_listener(settings: ListenerSettings, receiver: Receiver) -> Any:
    """Start the SCP in background threads; returns the server (call ``shutdown()``)."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # no identifier datasets in logs
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_RELEASED, handle_released, [receiver]),
        (evt.EVT_ABORTED, handle_aborted, [receiver]),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d", settings.ae_title, settings.host, settings.port)
    return server
