"""The index: what was received, per study, series and instance."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Instance, InstanceCopy, Series, Study
from pacs_agent.dicom.header import InstanceHeader


class IndexOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing to do
    REPLACED = "replaced"  # same SOP Instance UID, other bytes: the newer copy wins


class DuplicatePolicy(StrEnum):
    """What to do with an instance received again with other bytes (``listener.duplicates``)."""

    KEEP_FIRST = "keep-first"
    REPLACE = "replace"
    KEEP_BOTH = "keep-both"


class Arrival(StrEnum):
    """How the listener treats one received instance, given what the index holds."""

    NEW = "new"  # not indexed yet: store and index
    SAME = "same"  # indexed with identical bytes: answer success, store nothing
    KEEP_FIRST = "keep-first"  # other bytes, policy keep-first: answer success, store nothing
    REPLACE = "replace"  # other bytes, policy replace: overwrite and re-index
    KEEP_BOTH = "keep-both"  # other bytes, policy keep-both: store a second copy aside


def decide_arrival(indexed_sha256: str | None, sha256: str, policy: DuplicatePolicy) -> Arrival:
    """Pure: the treatment of an instance whose index digest is ``indexed_sha256`` (or None)."""
    if indexed_sha256 is None:
        return Arrival.NEW
    if indexed_sha256 == sha256:
        return Arrival.SAME
    return {
        DuplicatePolicy.KEEP_FIRST: Arrival.KEEP_FIRST,
        DuplicatePolicy.REPLACE: Arrival.REPLACE,
        DuplicatePolicy.KEEP_BOTH: Arrival.KEEP_BOTH,
    }[policy]


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size_bytes: int
    sha256: str
    transfer_syntax_uid: str
    calling_ae_title: str | None


def find_instance_digest(session_factory: sessionmaker[Session], sop_uid: str) -> str | None:
    with session_factory() as session:
        return session.scalar(select(Instance.sha256).where(Instance.sop_instance_uid == sop_uid))


def index_instance(
    session_factory: sessionmaker[Session],
    header: InstanceHeader,
    stored: StoredFile,
    now: datetime,
    *,
    reopen: bool = True,
) -> IndexOutcome:
    """Record one durable instance in one transaction.

    A study that was complete is re-opened when ``reopen`` (``assembler.late_instance =
    reprocess``); otherwise the instance is indexed and the study left as it is. Retries once
    on a unique-key race (two associations creating the same study at once).
    """
    for attempt in (1, 2):
        try:
            with session_factory.begin() as session:
                return _index(session, header, stored, now, reopen)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _index(
    session: Session, header: InstanceHeader, stored: StoredFile, now: datetime, reopen: bool
) -> IndexOutcome:
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid)
    )
    if study is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            patient_id=header.patient_id,
            accession_number=header.accession_number,
            study_date=header.study_date,
            study_description=header.study_description,
            status="receiving",
            first_received_at=now,
            last_received_at=now,
        )
        session.add(study)
        session.flush()

    series = session.scalar(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    )
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            series_description=header.series_description,
            series_number=header.series_number,
            image_type=header.image_type,
            slice_thickness=header.slice_thickness,
        )
        session.add(series)
        session.flush()

    instance = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
    )
    if instance is not None and instance.sha256 == stored.sha256:
        return IndexOutcome.DUPLICATE
    outcome = IndexOutcome.NEW if instance is None else IndexOutcome.REPLACED
    if instance is None:
        instance = Instance(sop_instance_uid=header.sop_instance_uid, series_id=series.id)
        session.add(instance)
    instance.sop_class_uid = header.sop_class_uid
    instance.transfer_syntax_uid = stored.transfer_syntax_uid
    instance.instance_number = header.instance_number
    instance.path = stored.relative_path
    instance.size_bytes = stored.size_bytes
    instance.sha256 = stored.sha256
    instance.calling_ae_title = stored.calling_ae_title
    instance.received_at = now

    if study.status == "receiving":
        study.last_received_at = now
    elif reopen:  # a late instance re-opens the study
        study.last_received_at = now
        study.status = "receiving"
        study.first_received_at = now
        study.completion = None
        study.completed_at = None
    return outcome


def mark_released(
    session_factory: sessionmaker[Session], study_uids: set[str], now: datetime
) -> None:
    """An association that carried these studies was released."""
    if not study_uids:
        return
    with session_factory.begin() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid.in_(study_uids))
            .values(last_released_at=now)
        )


def index_copy(
    session_factory: sessionmaker[Session], sop_uid: str, stored: StoredFile, now: datetime
) -> None:
    """Record a second copy (other bytes) of an indexed instance, kept by keep-both."""
    with session_factory.begin() as session:
        instance_id = session.scalar(
            select(Instance.id).where(Instance.sop_instance_uid == sop_uid)
        )
        if instance_id is None:
            raise LookupError("the first copy of this instance is not indexed")
        exists = session.scalar(
            select(InstanceCopy.id).where(InstanceCopy.path == stored.relative_path)
        )
        if exists is not None:
            return
        session.add(
            InstanceCopy(
                instance_id=instance_id,
                path=stored.relative_path,
                size_bytes=stored.size_bytes,
                sha256=stored.sha256,
                transfer_syntax_uid=stored.transfer_syntax_uid,
                calling_ae_title=stored.calling_ae_title,
                received_at=now,
            )
        )
