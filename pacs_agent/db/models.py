"""SQLAlchemy 2 models: studies, series, instances, jobs, findings, exports.

The database is the source of truth for work (DESIGN invariant 2). Timestamps are stored in
UTC and always come back timezone-aware, whatever the backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that is always timezone-aware UTC in Python (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    #: receiving -> complete (jobs created); a late instance sets it back to receiving.
    status: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    completion: Mapped[str | None] = mapped_column(String(32))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    #: ImageType values of the first instance, joined by a backslash (routing rules).
    image_type: Mapped[str | None] = mapped_column(String(128))
    slice_thickness: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    #: Relative to the spool directory.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceCopy(Base):
    """Another copy of an indexed instance (other bytes), kept by ``duplicates = keep-both``.

    It is recorded, not processed: the instance row keeps pointing at the first copy.
    """

    __tablename__ = "instance_copies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    #: Relative to the spool directory (under ``duplicates/``).
    path: Mapped[str] = mapped_column(String(512), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """One model run on one series. The outbox: the row commits before a task is sent."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_priority", "status", "priority"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str | None] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(128))
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    #: Relative to the results directory.
    seg_path: Mapped[str | None] = mapped_column(String(512))
    sr_path: Mapped[str | None] = mapped_column(String(512))
    #: Stage timings of the last run (seconds) and when inference succeeded.
    load_s: Mapped[float | None] = mapped_column(Float)
    inference_s: Mapped[float | None] = mapped_column(Float)
    write_s: Mapped[float | None] = mapped_column(Float)
    succeeded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The AI flag of this job's findings (none, positive, critical; pacs_agent.domain.flags)
    #: and the findings that made it; recorded with the findings.
    ai_flag: Mapped[str | None] = mapped_column(String(16))
    ai_flag_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="jobs")
    series: Mapped[Series] = relationship()
    findings: Mapped[list[Finding]] = relationship(back_populates="job")
    exports: Mapped[list[Export]] = relationship(back_populates="job")


class Finding(Base):
    """One segment (``kind`` segment) or one classification output (``kind``
    classification) of a job; numbered 1.. within its kind."""

    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", "segment_number", name="uq_findings_job_kind_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="segment", server_default="segment")
    segment_number: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(64))
    code_value: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_meaning: Mapped[str] = mapped_column(String(64))
    detected: Mapped[bool] = mapped_column(Boolean)
    voxel_count: Mapped[int] = mapped_column(BigInteger, default=0)
    volume_mm3: Mapped[float | None] = mapped_column(Float)
    mean_hu: Mapped[float | None] = mapped_column(Float)
    #: A segment's connected components that count (at least the card's minimum size), the
    #: volume of the largest, and the card's volume threshold for ``detected``.
    component_count: Mapped[int | None] = mapped_column(Integer)
    largest_component_mm3: Mapped[float | None] = mapped_column(Float)
    min_volume_mm3: Mapped[float | None] = mapped_column(Float)
    probability: Mapped[float | None] = mapped_column(Float)
    #: The model card's threshold of a classification; ``flag`` is probability >= threshold.
    threshold: Mapped[float | None] = mapped_column(Float)
    flag: Mapped[bool] = mapped_column(Boolean, default=False)

    job: Mapped[Job] = relationship(back_populates="findings")


class Export(Base):
    """One attempt to send one result object to one destination."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    #: 1.. within one export round of one destination.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: sent or failed.
    status: Mapped[str] = mapped_column(String(16))
    dicom_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="exports")


class Notification(Base):
    """One message about one job to one notifier (HL7 v2, FHIR, webhook): the outbox row.

    ``state``: pending (due at ``next_attempt_at``), queued (handed to the broker), sending
    (a worker holds it), sent, or failed (the receiver refused it, or the attempts ran out;
    ``pacs-agent notify retry`` sends it again).
    """

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("job_id", "notifier", "event", name="uq_notifications_job_notifier"),
        Index("ix_notifications_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    #: The notifier's name in the settings, and its kind (hl7, fhir, webhook).
    notifier: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    #: findings (the job succeeded) or failed (the AI could not process the series).
    event: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: What the receiver answered last: HL7 acknowledgment code, or HTTP status.
    response: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    job: Mapped[Job] = relationship()


class AuditEntry(Base):
    """One administrator action (reprocess, retry, cancel): who, what, when, and the outcome."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    #: The command's arguments as JSON.
    arguments: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    #: Ids of the jobs the action touched, as a JSON list.
    job_ids: Mapped[str] = mapped_column(Text)


class UpsWorkitem(Base):
    """A Unified Procedure Step (IHE AIW-I): one per AI job, or one a client asked for.

    Its state is derived from the job rows (``pacs_agent.domain.ups``); the columns keep what
    was last reported to subscribers, so a change is noticed and reported exactly once.
    """

    __tablename__ = "ups_workitems"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    #: The job it is (None for a workitem a client created for a study).
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    #: The AE that created it with N-CREATE (None for a job's own workitem).
    requested_by: Mapped[str | None] = mapped_column(String(16))
    #: The N-CREATE's attributes as DICOM JSON (returned by N-GET and C-FIND).
    attributes: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="SCHEDULED", index=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UpsSubscription(Base):
    """An AE subscribed to one workitem's events, or to all (``workitem_uid`` empty)."""

    __tablename__ = "ups_subscriptions"
    __table_args__ = (UniqueConstraint("ae_title", "workitem_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    workitem_uid: Mapped[str] = mapped_column(String(64), default="")
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UpsEvent(Base):
    """An N-EVENT-REPORT owed to a subscriber (the outbox): kept until delivered."""

    __tablename__ = "ups_events"
    __table_args__ = (Index("ix_ups_events_pending", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workitem_uid: Mapped[str] = mapped_column(UID, index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    #: Event Type ID: 1 UPS State Report, 2 Cancel Requested, 3 Progress Report.
    event_type: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
