"""Query/retrieve SCU: find studies on a PACS (C-FIND) and have it send them (C-MOVE to
our listener), or fetch them over our own association (C-GET).

Study Root information model. TCP_NODELAY is set after associating (FACTS: Nagle). Statuses
come back as data (:class:`MoveOutcome`), never as exceptions, except when no association
can be made (:class:`AssociationFailed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_agent.net.scu import AssociationFailed, set_nodelay

#: C-MOVE failure statuses (PS3.4 C.4.2.1.5), explained for an administrator.
MOVE_FAILURES = {
    0xA701: "the PACS is out of resources (could not count the matches)",
    0xA702: "the PACS is out of resources (could not perform the sub-operations)",
    0xA801: "move destination unknown: the PACS does not know our AE title "
    "(add it with our listener's host and port to the PACS's list of DICOM nodes)",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
}


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    modalities: tuple[str, ...]
    instances: int | None


@dataclass
class MoveOutcome:
    """The final C-MOVE response: status and sub-operation counts."""

    status: int | None  # None: no final response (association dropped or timed out)
    destination: str = ""
    operation: str = "C-MOVE"
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    error_comment: str | None = None
    failed_sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.failed == 0

    def explain(self) -> str:
        """One line for an administrator: what happened and, on failure, why."""
        counts = f"{self.completed} sent, {self.failed} failed, {self.warning} with warnings"
        if self.status is None:
            op = self.operation
            return f"no final {op} response (association lost or timed out); {counts}"
        if self.status == 0 and not self.failed:
            return f"{self.operation} success: {counts}"
        if self.status in (0x0000, 0xB000):
            return f"{self.operation} partly failed (status 0x{self.status:04X}): {counts}"
        why = MOVE_FAILURES.get(self.status)
        if why is None:
            why = "unable to process" if self.status >> 12 == 0xC else "failure"
        comment = f" ({self.error_comment})" if self.error_comment else ""
        return f"{self.operation} failed, status 0x{self.status:04X}: {why}{comment}; {counts}"


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called_ae: str
    calling_ae: str
    timeout_s: float = 30.0


def _associate(peer: Peer, context: str) -> object:
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    ae.add_requested_context(context)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected (is our AE title known to the PACS?)"
        else:
            why = "connection refused, timed out or aborted"
        raise AssociationFailed(
            f"no association with {peer.called_ae}@{peer.host}:{peer.port}: {why}"
        )
    set_nodelay(assoc)
    return assoc


def find_studies(
    peer: Peer, *, study_uid: str | None = None, accession_number: str | None = None
) -> list[FoundStudy]:
    """C-FIND at STUDY level by Study Instance UID or Accession Number.

    Raises AssociationFailed (unreachable, rejected) or RuntimeError (a failure status).
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid or ""
    query.AccessionNumber = accession_number or ""
    query.StudyDate = ""
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedInstances = ""
    assoc = _associate(peer, StudyRootQueryRetrieveInformationModelFind)
    found: list[FoundStudy] = []
    try:
        for status, identifier in assoc.send_c_find(  # type: ignore[attr-defined]
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if "Status" not in status:
                raise RuntimeError("C-FIND: no response from the PACS (timed out or aborted)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if not uid:
                    continue
                n = identifier.get("NumberOfStudyRelatedInstances")
                mods = identifier.get("ModalitiesInStudy") or []
                found.append(
                    FoundStudy(
                        study_instance_uid=uid,
                        accession_number=str(identifier.get("AccessionNumber") or "") or None,
                        study_date=str(identifier.get("StudyDate") or "") or None,
                        modalities=tuple(
                            str(m) for m in ([mods] if isinstance(mods, str) else mods)
                        ),
                        instances=int(n) if n not in (None, "") else None,
                    )
                )
            elif code != 0:
                comment = status.get("ErrorComment", "")
                raise RuntimeError(f"C-FIND failed with status 0x{code:04X} {comment}".strip())
    finally:
        if assoc.is_established:  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]
    return found


def _read_responses(
    responses: Iterator[tuple[Dataset, Dataset | None]], outcome: MoveOutcome
) -> None:
    """Fill ``outcome`` from the C-MOVE or C-GET responses: counts and the final status."""
    for status, identifier in responses:
        if "Status" not in status:
            break
        code = int(status.Status)
        for attr, keyword in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
            ("remaining", "NumberOfRemainingSuboperations"),
        ):
            value = status.get(keyword)
            if value not in (None, ""):
                setattr(outcome, attr, int(value))
        if code in (0xFF00, 0xFF01):
            continue
        outcome.status = code
        outcome.error_comment = str(status.get("ErrorComment", "") or "") or None
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            failed = identifier.FailedSOPInstanceUIDList
            outcome.failed_sop_instance_uids = (
                [str(failed)] if isinstance(failed, str) else [str(u) for u in failed]
            )


def move_study(peer: Peer, study_uid: str, destination_ae: str) -> MoveOutcome:
    """C-MOVE one study to ``destination_ae``; returns the final response.

    Raises AssociationFailed when no association can be made.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc: Any = _associate(peer, StudyRootQueryRetrieveInformationModelMove)
    outcome = MoveOutcome(status=None, destination=destination_ae)
    try:
        _read_responses(
            assoc.send_c_move(query, destination_ae, StudyRootQueryRetrieveInformationModelMove),
            outcome,
        )
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def _store_to(event: Any, out_dir: Path, written: list[Path]) -> int:
    """C-STORE sub-operation of a C-GET: the bytes as received, to ``out_dir``."""
    try:
        path = out_dir / f"{len(written):06d}.dcm"
        path.write_bytes(event.encoded_dataset(include_meta=True))
    except OSError:
        return 0xA700
    written.append(path)
    return 0x0000


def get_study(peer: Peer, study_uid: str, out_dir: Path) -> tuple[MoveOutcome, list[Path]]:
    """C-GET one study: its instances come back on our association (we are the storage SCP
    for pynetdicom's 120 common storage SOP classes) and are written to ``out_dir``.

    Raises AssociationFailed when no association can be made.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for context in StoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_requested_context(context.abstract_syntax)
        roles.append(build_role(context.abstract_syntax, scp_role=True))
    written: list[Path] = []
    assoc: Any = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.called_ae,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, _store_to, [out_dir, written])],
    )
    if not assoc.is_established:
        why = (
            "association rejected (is our AE title known to the PACS?)"
            if assoc.is_rejected
            else "connection refused, timed out or aborted"
        )
        raise AssociationFailed(
            f"no association with {peer.called_ae}@{peer.host}:{peer.port}: {why}"
        )
    set_nodelay(assoc)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    outcome = MoveOutcome(status=None, destination=peer.calling_ae, operation="C-GET")
    try:
        _read_responses(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), outcome)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome, written
