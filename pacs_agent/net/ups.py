"""The UPS SCP (IHE AIW-I) on its own pynetdicom AE, and delivery of its event reports.

Thin: each handler reads the request, calls ``pacs_agent.ups`` and answers a DICOM status
(decision 0019: why a second AE on ``ups.port``, not the listener's upper layer). The
agent performs its own workitems: clients create (N-CREATE: "process this study"), query
(C-FIND), read (N-GET), subscribe and ask to cancel (N-ACTION); N-SET and Change UPS State
are the performer's and refused to clients (0xC301: they do not hold the Transaction UID).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, cast

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepQuery,
    UnifiedProcedureStepWatch,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent import ups
from pacs_agent.config import Settings
from pacs_agent.db.models import utcnow
from pacs_agent.domain.ups import FINAL, UPS

log = logging.getLogger(__name__)

GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"
UPS_SOP_CLASSES = (
    UnifiedProcedureStepPush,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepWatch,
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepQuery,
)

# N-ACTION Action Type IDs (PS3.4 CC.2.4.2)
CHANGE_STATE = 1
REQUEST_CANCEL = 2
SUBSCRIBE = 3
UNSUBSCRIBE = 4
SUSPEND_GLOBAL = 5

Clock = Callable[[], datetime]


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _req(event: evt.Event) -> Any:
    """The DIMSE request primitive (typed by pynetdicom as a union of every service's)."""
    return event.request


def _caller(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


class UpsHandlers:
    """The UPS DIMSE handlers over one session factory (no globals, a clock passed in)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        clock: Clock = utcnow,
        on_created: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.clock = clock
        #: Told of each workitem a client created (wakes the retriever; never blocks).
        self.on_created = on_created

    def handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_N_CREATE, self.n_create),
            (evt.EVT_N_GET, self.n_get),
            (evt.EVT_N_SET, self.n_set),
            (evt.EVT_N_ACTION, self.n_action),
            (evt.EVT_C_FIND, self.c_find),
        ]

    def n_create(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        try:
            attrs = event.attribute_list
        except Exception:  # undecodable data set
            return _status(0x0110, "attribute list cannot be decoded"), None
        uid = str(_req(event).AffectedSOPInstanceUID or "") or None
        try:
            made = ups.create_requested(
                self.sessions, self.settings, uid, attrs, _caller(event), self.clock()
            )
        except ups.Refused as exc:
            return _status(exc.status, str(exc)), None
        except Exception:
            log.exception("UPS N-CREATE failed")
            return _status(0x0110, "processing failure"), None
        if self.on_created is not None:
            self.on_created(made)
        with self.sessions() as session:
            item = ups.find_workitem(session, made)
            assert item is not None
            return 0x0000, ups.workitem_dataset(session, item, self.settings.uid_root)

    def n_get(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        uid = str(_req(event).RequestedSOPInstanceUID)
        with self.sessions() as session:
            item = ups.find_workitem(session, uid)
            if item is None:
                return _status(0xC307, "no such workitem"), None
            full = ups.workitem_dataset(session, item, self.settings.uid_root)
        wanted = _req(event).AttributeIdentifierList
        if not wanted:
            return 0x0000, full
        tags = wanted if isinstance(wanted, list) else [wanted]
        out = Dataset()
        for tag in tags:
            if tag in full:
                out.add(cast(DataElement, full[tag]))
        return 0x0000, out

    def n_set(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        uid = str(_req(event).RequestedSOPInstanceUID)
        with self.sessions() as session:
            item = ups.find_workitem(session, uid)
            if item is None:
                return _status(0xC307, "no such workitem"), None
            if UPS(item.state) in FINAL:
                return _status(0xC300, f"workitem is {item.state}"), None
        return _status(0xC301, "pacs-agent performs this workitem"), None

    def n_action(self, event: evt.Event) -> tuple[Dataset | int, Dataset | None]:
        uid = str(_req(event).RequestedSOPInstanceUID)
        kind = int(event.action_type or 0)
        info = (
            event.action_information if kind in (SUBSCRIBE, REQUEST_CANCEL, CHANGE_STATE) else None
        )
        caller = _caller(event)
        now = self.clock()
        if kind in (SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL):
            if uid == FILTERED_GLOBAL_SUBSCRIPTION:
                return _status(0xC314, "filtered global subscription not supported"), None
            target = ups.GLOBAL if uid == GLOBAL_SUBSCRIPTION else uid
            ae = str((info or Dataset()).get("ReceivingAE", "") or caller).strip()
            if kind == SUBSCRIBE:
                lock = str((info or Dataset()).get("DeletionLock", "FALSE")).upper() == "TRUE"
                code = ups.subscribe(self.sessions, self.settings, target, ae, lock, now)
                log.info("UPS subscribe %s to %s: 0x%04X", ae, uid, code)
                return _status(code), None
            return _status(
                ups.unsubscribe(self.sessions, target, ae, suspend=kind == SUSPEND_GLOBAL)
            ), None
        if kind == REQUEST_CANCEL:
            code = ups.request_cancel(self.sessions, uid, caller, now)
            log.info("UPS cancel request from %s for %s: 0x%04X", caller, uid, code)
            return _status(code), None
        if kind == CHANGE_STATE:
            with self.sessions() as session:
                item = ups.find_workitem(session, uid)
                if item is None:
                    return _status(0xC307, "no such workitem"), None
                state = item.state
            wanted = str((info or Dataset()).get("ProcedureStepState", ""))
            if UPS(state) in FINAL:
                return _status(0xC300, f"workitem is {state}"), None
            if wanted == UPS.IN_PROGRESS.value and state == UPS.IN_PROGRESS.value:
                return _status(0xC302), None
            return _status(0xC301, "pacs-agent performs this workitem"), None
        return _status(0x0123, f"action type {kind}"), None

    def c_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        keys = event.identifier
        uid = str(keys.get("SOPInstanceUID", "") or "")
        state = str(keys.get("ProcedureStepState", "") or "")
        study = str(keys.get("StudyInstanceUID", "") or "")
        for item in keys.get("InputInformationSequence", []) or []:
            study = study or str(item.get("StudyInstanceUID", "") or "")
        with self.sessions() as session:
            items = ups.search(
                session,
                uid=uid or None,
                states=[s for s in state.split("\\") if s],
                study_uid=study or None,
                limit=self.settings.ups.max_find_results,
            )
            found = [ups.workitem_dataset(session, i, self.settings.uid_root) for i in items]
        for full in found:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            answer = Dataset()
            for elem in keys:
                if elem.tag in full:
                    answer[elem.tag] = full[elem.tag]
                else:
                    answer.add(elem)  # asked for, not known: returned as given (empty)
            answer.SOPInstanceUID = full.SOPInstanceUID
            yield 0xFF00, answer
        yield 0x0000, None


def build_ups_ae(settings: Settings) -> AE:
    # Workitems carry whatever a client put in them (patient data too): pynetdicom's debug
    # log of identifiers stays off (DESIGN invariant 6).
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.ups.ae_title)
    for sop in (*UPS_SOP_CLASSES, Verification):
        ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
    ae.add_requested_context(UnifiedProcedureStepEvent)
    t = settings.ups.timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
    ae.maximum_associations = 8
    # Only the configured worklist clients may associate (A-ASSOCIATE-RJ, calling AE title
    # not recognised), and only with our AE title: a UPS client can cancel jobs.
    # (``ups.enabled`` requires at least one: config.UpsSettings.)
    ae.require_calling_aet = [s.ae_title for s in settings.ups.subscribers]
    ae.require_called_aet = True
    return ae


def event_dataset(e: ups.Pending) -> Dataset:
    """The Event Information of one N-EVENT-REPORT (PS3.4 CC.2.4.2, Table CC.2.4-1)."""
    ds = Dataset()
    if e.event_type == ups.STATE_REPORT:
        ds.ProcedureStepState = e.state
        ds.InputReadinessState = "READY"
        if e.state == UPS.CANCELED.value and e.reason:
            ds.ReasonForCancellation = e.reason[:1024]
    else:
        progress = Dataset()
        progress.ProcedureStepProgress = e.progress
        ds.ProcedureStepProgressInformationSequence = [progress]
    return ds


class UpsService:
    """The UPS SCP and its event loop inside ``pacs-agent serve``."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], clock: Clock = utcnow
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.clock = clock
        self.ae = build_ups_ae(settings)
        self.server: ThreadedAssociationServer | None = None
        self.thread: threading.Thread | None = None
        self.retriever: threading.Thread | None = None
        self.wake = threading.Event()
        #: Workitems this process has tried to retrieve the study of (once each per process:
        #: after a restart, those still waiting are tried again).
        self.tried: set[str] = set()

    @property
    def retrieves(self) -> bool:
        """Whether a requested study not held here is retrieved from the PACS."""
        return self.settings.query_retrieve.ae_title is not None

    def start(self, stop: threading.Event) -> None:
        handlers = UpsHandlers(
            self.settings,
            self.sessions,
            self.clock,
            on_created=lambda _uid: self.wake.set(),
        ).handlers()
        self.server = self.ae.start_server(
            (self.settings.ups.host, self.settings.ups.port),
            block=False,
            evt_handlers=handlers,
        )
        self.thread = threading.Thread(
            target=self.run, args=(stop,), name="ups-events", daemon=True
        )
        self.thread.start()
        if self.retrieves:
            self.retriever = threading.Thread(
                target=self.run_retrieves, args=(stop,), name="ups-retrieve", daemon=True
            )
            self.retriever.start()
        log.info(
            "UPS SCP %s on %s:%d",
            self.settings.ups.ae_title,
            self.settings.ups.host,
            self.settings.ups.port,
        )

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the database away: try again next time, nothing is lost
                log.exception("UPS event loop")
            stop.wait(self.settings.ups.poll_interval_s)

    def run_retrieves(self, stop: threading.Event) -> None:
        """Retrieve, one at a time, the studies clients asked for that are not held here.
        Its own thread: a C-MOVE may take minutes, and neither the association that asked
        nor the delivery of events waits for it."""
        while not stop.is_set():
            try:
                self.retrieve_waiting()
            except Exception:  # the database away: try again next time
                log.exception("UPS retrieve loop")
            self.wake.wait(self.settings.ups.poll_interval_s)
            self.wake.clear()

    def retrieve_waiting(self) -> int:
        """Retrieve the study of each waiting workitem not tried yet. Returns how many."""
        with self.sessions() as session:
            waiting = [u for u in ups.awaiting_retrieve(session) if u not in self.tried]
        for uid in waiting:
            self.tried.add(uid)
            ups.retrieve_requested(self.sessions, self.settings, uid, self.clock)
        return len(waiting)

    def tick(self) -> int:
        """Refresh workitems from the jobs, then deliver what is owed. Returns events sent."""
        ups.refresh(self.sessions, self.settings.uid_root, self.clock())
        with self.sessions() as session:
            owed = ups.pending_events(session, self.clock())
        sent = 0
        for ae_title, events in owed.items():
            sent += self.deliver(ae_title, events)
        return sent

    def deliver(self, ae_title: str, events: list[ups.Pending]) -> int:
        """Send one subscriber its events in order over one association; stop at the first
        failure (kept, tried again later with a growing wait)."""
        peer = next((s for s in self.settings.ups.subscribers if s.ae_title == ae_title), None)
        if peer is None:
            ups.mark_failed(
                self.sessions,
                events[0].id,
                "AE no longer in ups.subscribers",
                self.settings,
                self.clock(),
            )
            return 0
        assoc = self.ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            ups.mark_failed(
                self.sessions, events[0].id, "association failed", self.settings, self.clock()
            )
            log.warning(
                "UPS events for %s: cannot associate with %s:%d", ae_title, peer.host, peer.port
            )
            return 0
        sent = 0
        try:
            for e in events:
                error = self._send(assoc, e)
                if error:
                    ups.mark_failed(self.sessions, e.id, error, self.settings, self.clock())
                    log.warning("UPS event %d to %s: %s", e.id, ae_title, error)
                    break
                ups.mark_delivered(self.sessions, e.id, self.clock())
                sent += 1
        finally:
            assoc.release()
        return sent

    @staticmethod
    def _send(assoc: Association, e: ups.Pending) -> str:
        status, _ = assoc.send_n_event_report(
            event_dataset(e),
            e.event_type,
            UnifiedProcedureStepPush,  # PS3.4 CC.2.4: the UPS Push SOP Class UID
            e.workitem_uid,
            meta_uid=UnifiedProcedureStepEvent,  # on the UPS Event context
        )
        code = getattr(status, "Status", None)
        if code is None:
            return "no response"
        if code != 0x0000:
            return f"status 0x{code:04X}"
        return ""

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
