"""Retrieve a study from the PACS into the agent: C-FIND it, then C-MOVE it to our listener
(or C-GET it and C-STORE it to our listener ourselves).

Either way the study reaches ``pacs-agent serve``'s listener over C-STORE, so it is spooled,
indexed, assembled and routed exactly as if the PACS had pushed it. Audited.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.admin import audit
from pacs_agent.config import Settings
from pacs_agent.db.models import Instance, Series, Study
from pacs_agent.net.qr import (
    FoundStudy,
    MoveOutcome,
    Peer,
    find_studies,
    get_study,
    move_study,
)
from pacs_agent.net.scu import AssociationFailed, store_files


class RetrieveError(Exception):
    """Retrieve could not start or find anything; ``kind`` is settings, unreachable,
    query_failed or not_found."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RetrievedStudy:
    study_instance_uid: str
    accession_number: str | None
    outcome: MoveOutcome
    #: NumberOfStudyRelatedInstances from the C-FIND (None: the PACS did not say).
    expected_instances: int | None = None
    #: Instances of the study new in our index since the C-MOVE began.
    received_instances: int = 0
    #: Instances of the study in our index once the C-MOVE ended.
    held_instances: int = 0
    #: ok, partial or failed.
    state: str = "failed"
    explanation: str = ""


def judge(
    outcome: MoveOutcome, expected: int | None, arrived: int, held: int, destination: str
) -> tuple[str, str]:
    """(ok | partial | failed, one line for an administrator) of one study's retrieve.

    ``arrived``: instances new in our index since the C-MOVE began; ``held``: the study's
    instances in our index after it. What arrived is counted in our own index, not only in
    the PACS's sub-operation counts: some PACSs (Orthanc 1.10) stop at the first refused
    sub-operation with 0xC000 and no counts.
    """
    text = outcome.explain()
    have = f"{arrived} arrived, {held} of {expected if expected is not None else '?'} held here"
    complete = expected is None or held >= expected
    if outcome.ok and complete:
        return "ok", f"{text}; {have}"
    if arrived > 0 or outcome.ok:
        return "partial", f"{text}; only {have}" if not complete else f"{text}; {have}"
    hint = ""
    if outcome.status is not None and (outcome.status >> 12 == 0xC or outcome.status == 0xA801):
        hint = (
            f"; nothing arrived: most often the PACS does not know the move destination "
            f"{destination} (add it, with our listener's host and port, to the PACS's DICOM "
            "nodes; Orthanc answers 0xC000 for that, the standard says 0xA801)"
        )
    return "failed", f"{text}; {have}{hint}"


@dataclass
class RetrieveReport:
    destination: str
    studies: list[RetrievedStudy] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return all(s.state == "ok" for s in self.studies)

    @property
    def any_sent(self) -> bool:
        """Something of the request is here: instances arrived in this run, or a study is
        whole (it may have arrived in an earlier run). Else the retrieve got nothing."""
        return any(s.received_instances or s.state == "ok" for s in self.studies)


def _instances_here(
    session_factory: sessionmaker[Session], study_uid: str, after_id: int = 0
) -> tuple[int, int]:
    """(count, highest id) of the study's instances in our index with an id above
    ``after_id``. Each is committed before its C-STORE is answered, so every one the PACS
    sent is counted once the C-MOVE has ended."""
    with session_factory() as session:
        n, top = session.execute(
            select(func.count(Instance.id), func.max(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_uid, Instance.id > after_id)
        ).one()
    return int(n or 0), int(top or 0)


def _top_instance_id(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.max(Instance.id))) or 0)


def _get_and_forward(settings: Settings, peer: Peer, study_uid: str) -> MoveOutcome:
    """C-GET the study into a temporary folder under ``data_dir``, then C-STORE it to our
    listener. Instances the listener refuses count as failed sub-operations. When the
    listener cannot be reached the files are kept and the error says where."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="retrieve-", dir=settings.data_dir))
    outcome, files = get_study(peer, study_uid, folder)
    if not files:
        shutil.rmtree(folder, ignore_errors=True)
        return outcome
    host = settings.listener.host
    try:
        stored = store_files(
            host="127.0.0.1" if host in ("0.0.0.0", "::", "") else host,
            port=settings.listener.port,
            called_ae=settings.listener.ae_title,
            calling_ae=peer.calling_ae,
            paths=files,
            timeout_s=settings.query_retrieve.timeout_s,
        )
    except AssociationFailed as exc:
        outcome.error_comment = (
            f"got {len(files)} instances from the PACS but our listener did not take them "
            f"({exc}; is pacs-agent serve running?); they are kept in {folder}"
        )
        outcome.status = None
        return outcome
    refused = [o for o in stored if not o.ok]
    outcome.completed = max(0, outcome.completed - len(refused))
    outcome.failed += len(refused)
    outcome.failed_sop_instance_uids += [o.sop_instance_uid for o in refused]
    shutil.rmtree(folder, ignore_errors=True)
    return outcome


def peer_from(settings: Settings) -> Peer:
    qr = settings.query_retrieve
    if qr.ae_title is None:
        raise RetrieveError(
            "settings", "no PACS to query: set query_retrieve.ae_title, host and port"
        )
    return Peer(
        host=qr.host,
        port=qr.port,
        called_ae=qr.ae_title,
        calling_ae=qr.calling_ae_title or settings.export.calling_ae_title,
        timeout_s=qr.timeout_s,
    )


def retrieve(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    study_uid: str | None = None,
    accession_number: str | None = None,
    actor: str,
    now: datetime,
) -> RetrieveReport:
    """Find the study (by UID or accession number; an accession may name several studies)
    and C-MOVE each one to our listener. Raises RetrieveError before any move."""
    if (study_uid is None) == (accession_number is None):
        raise RetrieveError("settings", "give a Study Instance UID or an accession number")
    peer = peer_from(settings)
    destination = settings.query_retrieve.move_destination or settings.listener.ae_title
    if settings.query_retrieve.method == "get":
        destination = f"{settings.listener.ae_title} (C-GET, then C-STORE)"
    try:
        found: list[FoundStudy] = find_studies(
            peer, study_uid=study_uid, accession_number=accession_number
        )
    except AssociationFailed as exc:
        raise RetrieveError("unreachable", f"the PACS cannot be queried: {exc}") from exc
    except RuntimeError as exc:
        raise RetrieveError("query_failed", str(exc)) from exc
    if study_uid and not any(f.study_instance_uid == study_uid for f in found):
        found = []
    args = {"study_uid": study_uid, "accession_number": accession_number, "pacs": peer.called_ae}
    if not found:
        with session_factory.begin() as session:
            audit(session, actor, "retrieve", args, "not found on the PACS", [], now)
        what = f"study {study_uid}" if study_uid else f"accession number {accession_number}"
        raise RetrieveError("not_found", f"the PACS {peer.called_ae} has no {what}")
    report = RetrieveReport(destination)
    for f in found:
        before = _top_instance_id(session_factory)
        try:
            if settings.query_retrieve.method == "get":
                outcome = _get_and_forward(settings, peer, f.study_instance_uid)
            else:
                outcome = move_study(peer, f.study_instance_uid, destination)
        except AssociationFailed as exc:
            outcome = MoveOutcome(status=None, error_comment=str(exc))
        item = RetrievedStudy(
            f.study_instance_uid,
            f.accession_number,
            outcome,
            expected_instances=f.instances,
            received_instances=_instances_here(session_factory, f.study_instance_uid, before)[0],
            held_instances=_instances_here(session_factory, f.study_instance_uid)[0],
        )
        item.state, item.explanation = judge(
            outcome, f.instances, item.received_instances, item.held_instances, destination
        )
        if outcome.status is None and outcome.error_comment:
            item.explanation = outcome.error_comment
        report.studies.append(item)
    with session_factory.begin() as session:
        audit(
            session,
            actor,
            "retrieve",
            {**args, "destination": destination},
            "; ".join(f"{s.study_instance_uid}: {s.explanation}" for s in report.studies),
            [],
            now,
        )
    return report
