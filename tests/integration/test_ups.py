"""DICOM UPS (IHE AIW-I) against a real ``pacs-agent serve``: pynetdicom worklist clients.

Studies go in with dcmtk storescu and come back to a real Orthanc; a worklist client queries
(C-FIND), reads (N-GET), creates (N-CREATE), subscribes (N-ACTION, global and per workitem)
and receives N-EVENT-REPORTs on its own SCP. dcmtk has no UPS tool (findscu's information
models are worklist, patient, study and patient/study only), so every UPS peer here is
pynetdicom.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
    UPSGlobalSubscriptionInstance,
)
from sqlalchemy import select

from pacs_agent.db.models import AuditEntry, Job, UpsWorkitem
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.orchestration import jobs_of, send_study, small_study, wait_all_exported
from tests.helpers.servers import free_port, wait_for
from tests.integration.test_orchestration import Site, database_for, make_site

pytestmark = pytest.mark.integration

CLIENT = "WORKLIST"


@dataclass
class Watcher:
    """A worklist client's SCP for UPS Event: records every N-EVENT-REPORT it is sent."""

    port: int
    events: list[tuple[str, int, str, int | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=CLIENT)
        ae.add_supported_context(UnifiedProcedureStepEvent)

        def on_report(event: evt.Event) -> tuple[int, None]:
            info = event.event_information
            progress = None
            if "ProcedureStepProgressInformationSequence" in info:
                progress = int(
                    info.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress
                )
            req: Any = event.request
            with self.lock:
                self.events.append(
                    (
                        str(req.AffectedSOPInstanceUID),
                        int(event.event_type or 0),
                        str(info.get("ProcedureStepState", "")),
                        progress,
                    )
                )
            return 0x0000, None

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def states(self, uid: str) -> list[str]:
        with self.lock:
            return [s for u, t, s, _ in self.events if u == uid and t == 1]


@contextmanager
def ups_client(port: int) -> Iterator[Any]:
    ae = AE(ae_title=CLIENT)
    for sop in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch):
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def subscribe(port: int, uid: str = UPSGlobalSubscriptionInstance) -> int:
    info = Dataset()
    info.ReceivingAE = CLIENT
    info.DeletionLock = "FALSE"
    with ups_client(port) as assoc:
        status, _ = assoc.send_n_action(info, 3, UnifiedProcedureStepWatch, uid)
    return int(status.Status)


def find(port: int, **keys: str) -> list[Dataset]:
    query = Dataset()
    query.SOPInstanceUID = ""
    query.ProcedureStepState = ""
    query.StudyInstanceUID = ""
    query.ProcedureStepLabel = ""
    for k, v in keys.items():
        setattr(query, k, v)
    with ups_client(port) as assoc:
        out = [
            ident
            for status, ident in assoc.send_c_find(query, UnifiedProcedureStepPull)
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None
        ]
    return out


def n_get(port: int, uid: str) -> Dataset:
    with ups_client(port) as assoc:
        status, ds = assoc.send_n_get([], UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000, status
    assert ds is not None
    return ds


def request_for(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.ProcedureStepState = "SCHEDULED"
    ds.ProcedureStepLabel = "AI please"
    ds.ScheduledProcedureStepPriority = "HIGH"
    inp = Dataset()
    inp.StudyInstanceUID = study_uid
    ds.InputInformationSequence = [inp]
    return ds


def n_create(port: int, ds: Dataset, uid: str) -> int:
    with ups_client(port) as assoc:
        status, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
    return int(status.Status)


def request_cancel(port: int, uid: str) -> int:
    info = Dataset()
    info.ReasonForCancellation = "not needed"
    with ups_client(port) as assoc:
        status, _ = assoc.send_n_action(info, 2, UnifiedProcedureStepPush, uid)
    return int(status.Status)


@contextmanager
def ups_site(
    tmp_path: Path,
    watcher_port: int,
    *,
    with_worker: bool = True,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
    orthanc_port: int | None = None,
) -> Iterator[tuple[Site, int]]:
    ups_port = free_port()
    env = {
        "PACS_AGENT_UPS__ENABLED": "true",
        "PACS_AGENT_UPS__PORT": str(ups_port),
        "PACS_AGENT_UPS__POLL_INTERVAL_S": "0.2",
        "PACS_AGENT_UPS__RETRY_INITIAL_S": "0.5",
        "PACS_AGENT_UPS__RETRY_MAX_S": "1",
        "PACS_AGENT_UPS__SUBSCRIBERS": json.dumps(
            [{"ae_title": CLIENT, "host": "127.0.0.1", "port": watcher_port}]
        ),
        **(env or {}),
    }
    with make_site(
        tmp_path,
        None,
        with_worker=with_worker,
        env=env,
        database_url=database_url,
        orthanc_port=orthanc_port,
    ) as site:
        yield site, ups_port


def workitems(database_url: str) -> list[UpsWorkitem]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as s:
            return list(s.scalars(select(UpsWorkitem).order_by(UpsWorkitem.id)))
    finally:
        engine.dispose()


def test_a_subscriber_sees_each_job_go_scheduled_in_progress_completed_and_can_find_and_get_it(
    tmp_path: Path,
) -> None:
    watcher = Watcher(free_port())
    watcher.start()
    try:
        with ups_site(tmp_path, watcher.port) as (site, port):
            assert subscribe(port) == 0x0000
            # A client asks for a study to be processed before the study is pushed.
            study_uid, files = small_study(site.workdir / "studies", 7)
            requested = "2.25.1234567890123456789"
            assert n_create(port, request_for(study_uid), requested) == 0x0000
            assert n_create(port, request_for(study_uid), requested) == 0x0111  # duplicate
            bad = request_for(study_uid)
            bad.ProcedureStepState = "IN PROGRESS"
            assert n_create(port, bad, "2.25.99") == 0xC309
            assert find(port, ProcedureStepState="SCHEDULED")[0].SOPInstanceUID == requested

            send_study(files, site.agent.port)
            (job,) = wait_all_exported(site.database_url, 1, 240, site.logs)
            items = {w.job_id: w for w in workitems(site.database_url)}
            job_item = items[job.id].sop_instance_uid

            def all_completed() -> bool:
                return watcher.states(job_item)[-1:] == ["COMPLETED"] and watcher.states(requested)[
                    -1:
                ] == ["COMPLETED"]

            wait_for(
                all_completed, 30, "COMPLETED reports for the job's and the requested workitem"
            )
            assert watcher.states(job_item) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
            assert watcher.states(requested) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]

            done = find(port, ProcedureStepState="COMPLETED", StudyInstanceUID=study_uid)
            assert {d.SOPInstanceUID for d in done} == {job_item, requested}
            assert find(port, ProcedureStepState="SCHEDULED") == []
            got = n_get(port, job_item)
            assert got.ProcedureStepState == "COMPLETED"
            assert got.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 100
            outputs = got.UnifiedProcedureStepPerformedProcedureSequence[
                0
            ].OutputInformationSequence
            refs = {o.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for o in outputs}
            assert refs == {job.seg_sop_instance_uid, job.sr_sop_instance_uid}
            assert n_get(port, requested).ProcedureStepLabel == "AI please"
            # A completed workitem cannot be cancelled.
            assert request_cancel(port, job_item) == 0xC311
    finally:
        watcher.stop()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_cancel_requests_cancel_the_job_audited_and_a_subscriber_that_was_down_loses_nothing(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    watcher = Watcher(free_port())  # not started yet: the subscriber is down
    try:
        with ups_site(
            tmp_path, watcher.port, with_worker=False, database_url=database_for(db, request)
        ) as (site, port):
            assert subscribe(port) == 0x0000
            study_uid = site.send(3)
            wait_for(lambda: workitems(site.database_url), 30, "the job's workitem")
            (item,) = workitems(site.database_url)
            assert item.state == "SCHEDULED"
            assert find(port, StudyInstanceUID=study_uid)[0].ProcedureStepState == "SCHEDULED"
            # A client may not take the agent's workitem in hand or change it.
            info = Dataset()
            info.ProcedureStepState = "IN PROGRESS"
            info.TransactionUID = "2.25.5"
            with ups_client(port) as assoc:
                status, _ = assoc.send_n_action(
                    info, 1, UnifiedProcedureStepPull, item.sop_instance_uid
                )
            assert status.Status == 0xC301
            assert request_cancel(port, "2.25.404") == 0xC307

            # A request for the study already received follows the job already under way.
            requested = "2.25.777"
            assert n_create(port, request_for(study_uid), requested) == 0x0000
            assert n_get(port, requested).ProcedureStepState == "SCHEDULED"

            assert request_cancel(port, item.sop_instance_uid) == 0x0000
            (job,) = jobs_of(site.database_url)
            assert job.status == "cancelled"
            engine = make_engine(site.database_url)
            with make_session_factory(engine)() as s:
                entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "cancel")).one()
                assert entry.actor == f"ups:{CLIENT}"
                assert json.loads(entry.job_ids) == [job.id]
                assert s.get(Job, job.id) is not None
            engine.dispose()
            wait_for(
                lambda: [w.state for w in workitems(site.database_url)] == ["CANCELED"] * 2,
                30,
                "both workitems CANCELED",
            )
            assert request_cancel(port, item.sop_instance_uid) == 0xB304

            # The subscriber comes up: everything owed arrives, in order.
            watcher.start()
            wait_for(
                lambda: watcher.states(item.sop_instance_uid)[-1:] == ["CANCELED"], 30, "reports"
            )
            assert watcher.states(item.sop_instance_uid) == ["SCHEDULED", "CANCELED"]
            wait_for(lambda: watcher.states(requested)[-1:] == ["CANCELED"], 30, "reports")
            assert watcher.states(requested) == ["SCHEDULED", "CANCELED"]
            # Unknown AEs cannot subscribe: the agent would not know where to send.
            info = Dataset()
            info.ReceivingAE = "STRANGER"
            with ups_client(port) as assoc:
                status, _ = assoc.send_n_action(
                    info, 3, UnifiedProcedureStepWatch, UPSGlobalSubscriptionInstance
                )
            assert status.Status == 0xC308

            # A request for a study never sent, cancelled: CANCELED at once, audited.
            never = "2.25.888"
            assert n_create(port, request_for("2.25.999"), never) == 0x0000
            assert request_cancel(port, never) == 0x0000
            wait_for(lambda: watcher.states(never)[-1:] == ["CANCELED"], 30, "CANCELED report")
            assert watcher.states(never) == ["SCHEDULED", "CANCELED"]
            assert n_get(port, never).ProcedureStepState == "CANCELED"
    finally:
        watcher.stop()


def test_only_configured_clients_may_associate_and_a_request_must_name_its_study(
    tmp_path: Path,
) -> None:
    with ups_site(tmp_path, free_port(), with_worker=False) as (_site, port):
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(UnifiedProcedureStepPush)
        assoc = stranger.associate("127.0.0.1", port, ae_title="PACSAGENT")
        assert assoc.is_rejected
        wrong_called = AE(ae_title=CLIENT)
        wrong_called.add_requested_context(UnifiedProcedureStepPush)
        assoc = wrong_called.associate("127.0.0.1", port, ae_title="SOMEONE")
        assert assoc.is_rejected

        nameless = Dataset()
        nameless.ProcedureStepState = "SCHEDULED"
        assert n_create(port, nameless, "2.25.1") == 0x0120
        with ups_client(port) as assoc:
            status, _ = assoc.send_n_get([], UnifiedProcedureStepPush, "2.25.404")
            assert status.Status == 0xC307
            change = Dataset()
            change.ProcedureStepLabel = "mine now"
            status, _ = assoc.send_n_set(change, UnifiedProcedureStepPull, "2.25.404")
            assert status.Status == 0xC307


def test_a_request_for_a_study_only_the_pacs_holds_retrieves_it_and_completes_and_one_it_lacks_is_canceled(  # noqa: E501
    tmp_path: Path,
) -> None:
    watcher = Watcher(free_port())
    watcher.start()
    # query_retrieve names the PACS (Orthanc): its port is known once the site is made, so
    # the site's Orthanc is started first with a fixed port chosen here.
    orthanc_port = free_port()
    env = {
        "PACS_AGENT_QUERY_RETRIEVE__AE_TITLE": "ORTHANC",
        "PACS_AGENT_QUERY_RETRIEVE__HOST": "127.0.0.1",
        "PACS_AGENT_QUERY_RETRIEVE__PORT": str(orthanc_port),
        "PACS_AGENT_QUERY_RETRIEVE__TIMEOUT_S": "20",
    }
    try:
        with ups_site(tmp_path, watcher.port, env=env, orthanc_port=orthanc_port) as (site, port):
            assert site.orthanc.dicom_port == orthanc_port
            assert subscribe(port) == 0x0000
            study_uid, files = small_study(site.workdir / "pacs", 17)
            for f in files:
                site.orthanc.upload(f)  # the PACS has it; the agent never received it

            requested = "2.25.4242"
            assert n_create(port, request_for(study_uid), requested) == 0x0000
            wait_for(
                lambda: watcher.states(requested)[-1:] == ["COMPLETED"],
                240,
                "the requested workitem COMPLETED after the study was retrieved",
            )
            assert watcher.states(requested) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
            (job,) = jobs_of(site.database_url)
            assert job.status == "exported"

            # A study the PACS does not have: the workitem ends CANCELED with the reason.
            missing = "2.25.4343"
            assert n_create(port, request_for("1.2.826.0.1.3680043.10.9999.404"), missing) == 0
            wait_for(lambda: watcher.states(missing)[-1:] == ["CANCELED"], 60, "CANCELED")
            assert watcher.states(missing) == ["SCHEDULED", "CANCELED"]
            reason = (
                n_get(port, missing)
                .ProcedureStepProgressInformationSequence[0]
                .ReasonForCancellation
            )
            assert "has no study 1.2.826.0.1.3680043.10.9999.404" in reason

            engine = make_engine(site.database_url)
            try:
                with make_session_factory(engine)() as s:
                    audited = list(
                        s.scalars(select(AuditEntry).where(AuditEntry.action == "retrieve"))
                    )
            finally:
                engine.dispose()
            assert [a.actor for a in audited] == [f"ups:{CLIENT}"] * 2
            assert study_uid in audited[0].arguments and "not found" in audited[1].outcome
    finally:
        watcher.stop()
