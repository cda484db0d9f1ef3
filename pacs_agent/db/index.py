"""The index: what was received, per study, series and instance."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Instance, Series, Study
from pacs_agent.dicom.header import InstanceHeader


class IndexOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing to do
    REPLACED = "replaced"  # same SOP Instance UID, other bytes: the newer copy wins


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
) -> IndexOutcome:
    """Record one durable instance in one transaction; re-opens a study that was complete.

    Retries once on a unique-key race (two associations creating the same study at once).
    """
    for attempt in (1, 2):
        try:
            with session_factory.begin() as session:
                return _index(session, header, stored, now)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _index(
    session: Session, header: InstanceHeader, stored: StoredFile, now: datetime
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

    study.last_received_at = now
    if study.status != "receiving":  # a late instance re-opens the study
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
