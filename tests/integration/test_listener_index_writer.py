"""The index writer's group commit over a real SQLite index: every waiting C-STORE gets its
own outcome, and one row that cannot be written fails alone."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_agent.db.index import IndexOutcome, IndexWriter, StoredFile
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.header import InstanceHeader

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _header(study: str, series: str) -> InstanceHeader:
    return InstanceHeader(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        patient_id=None,
        accession_number=None,
        study_date=None,
        study_description=None,
        series_description=None,
        body_part_examined=None,
        series_number=1,
        instance_number=1,
    )


def test_concurrent_instances_are_indexed_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    writer = IndexWriter(session_factory)
    study, series = generate_uid(), generate_uid()
    results: dict[int, object] = {}

    def send(n: int) -> None:
        path = None if n == 7 else f"{n}.dcm"  # NOT NULL: this row cannot be written
        stored = StoredFile(path, 1, f"{n:064x}", "1.2.840.10008.1.2.1", "A")  # type: ignore[arg-type]
        try:
            results[n] = writer.index(_header(study, series), stored, NOW)
        except Exception as exc:
            results[n] = exc

    try:
        send(0)  # the series is now known: the others take the batched path
        threads = [threading.Thread(target=send, args=(n,)) for n in range(1, 24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        writer.close()
    assert isinstance(results.pop(7), Exception)
    assert set(results.values()) == {IndexOutcome.NEW}
    assert len(results) == 23
    with session_factory() as s:
        assert s.scalar(select(func.count(Instance.id))) == 23
