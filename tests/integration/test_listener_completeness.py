"""Completeness per routing rule, decided by the real scheduler over a real index (SQLite),
with the clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.catalog import load_catalog
from pacs_agent.config import Settings
from pacs_agent.db.index import StoredFile, index_instance, mark_released
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.header import InstanceHeader
from pacs_agent.queue import CeleryDispatcher, make_celery
from pacs_agent.scheduler import Scheduler

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _receive(session_factory: sessionmaker[Session], study: str, modality: str) -> None:
    header = InstanceHeader(
        study_instance_uid=study,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
        patient_id=None,
        accession_number=None,
        study_date=None,
        study_description=None,
        series_description=None,
        body_part_examined=None,
        series_number=1,
        instance_number=1,
    )
    stored = StoredFile("x.dcm", 1, "0" * 64, "1.2.840.10008.1.2.1", "CT1")
    index_instance(session_factory, header, stored, T0)
    mark_released(session_factory, {study}, T0)


def test_each_rule_completes_its_studies_after_its_own_idle_time(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        assembler={"idle_timeout_s": 3, "unreleased_timeout_s": 600, "max_wait_s": 3600},
        models={
            "rules": [
                {"name": "ct", "modality": ["CT"], "models": ["demo_ct_blob_seg"]},
                {
                    "name": "slow-mr",
                    "modality": ["MR"],
                    "models": ["demo_ct_blob_seg"],
                    "idle_timeout_s": 60,
                },
                {
                    "name": "quick-dx",
                    "modality": ["DX"],
                    "models": ["demo_cr_nodule_cls"],
                    "idle_timeout_s": 1,
                },
            ]
        },
    )
    upgrade(settings.database_url)
    session_factory = make_session_factory(make_engine(settings.database_url))
    scheduler = Scheduler(
        settings,
        session_factory,
        CeleryDispatcher(make_celery(settings)),
        catalog=lambda: load_catalog(settings.models_dir),
    )
    ct, mr, dx, ct_and_mr = (generate_uid() for _ in range(4))
    _receive(session_factory, ct, "CT")
    _receive(session_factory, mr, "MR")
    _receive(session_factory, dx, "DX")
    _receive(session_factory, ct_and_mr, "CT")
    _receive(session_factory, ct_and_mr, "MR")

    def complete() -> set[str]:
        with session_factory() as s:
            return set(
                s.scalars(select(Study.study_instance_uid).where(Study.status == "complete"))
            )

    scheduler.complete_studies(T0 + timedelta(seconds=1.5))
    assert complete() == {dx}  # its rule's own 1 s
    scheduler.complete_studies(T0 + timedelta(seconds=4))
    assert complete() == {dx, ct}  # the [assembler] 3 s
    scheduler.complete_studies(T0 + timedelta(seconds=59))
    assert complete() == {dx, ct}  # MR waits for its rule's 60 s, and so does CT+MR
    scheduler.complete_studies(T0 + timedelta(seconds=61))
    assert complete() == {dx, ct, mr, ct_and_mr}
    with session_factory() as s:
        assert len(s.scalars(select(Job)).all()) == 5  # one per matching series
