"""The index writer's group commit over a real SQLite index: every waiting C-STORE gets its
own outcome, and one row that cannot be written fails alone."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text

from pacs_agent.db.index import (
    IndexOutcome,
    IndexTimeout,
    IndexWriter,
    StoredFile,
    WriterBusy,
)
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


@pytest.mark.parametrize("queued_with", ["index", "index_here"])
def test_a_timed_out_row_still_queued_is_withdrawn_and_never_written(
    tmp_path: Path, queued_with: str
) -> None:
    """A C-STORE that gave up (0xA700) must not find its row committed later: the listener
    may have removed the file by then. A row the writer already took may still commit, and
    says so. ``index_here`` does not go around a busy writer: its row is queued and times out
    like any other (it is not left hanging on the lock)."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    writer = IndexWriter(session_factory, timeout_s=0.5)
    study, series = generate_uid(), generate_uid()
    first, second = _header(study, series), _header(study, series)
    outcomes: dict[str, object] = {}

    def send(name: str, header: InstanceHeader, call: Any) -> None:
        stored = StoredFile(f"{name}.dcm", 1, "0" * 64, "1.2.840.10008.1.2.1", "A")
        try:
            outcomes[name] = call(header, stored, NOW)
        except Exception as exc:
            outcomes[name] = exc

    blocker = engine.connect()
    blocker.begin()  # BEGIN IMMEDIATE: the write lock, held
    try:
        taken = threading.Thread(target=send, args=("first", first, writer.index))
        taken.start()
        deadline = time.monotonic() + 5
        while not writer._busy.locked() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the writer has taken the first row (and waits for the lock)
        # Queued behind it, times out, is withdrawn.
        send("second", second, getattr(writer, queued_with))
        taken.join(5)
    finally:
        blocker.rollback()
        blocker.close()
    assert isinstance(outcomes["first"], IndexTimeout) and not outcomes["first"].cancelled
    assert isinstance(outcomes["second"], IndexTimeout) and outcomes["second"].cancelled
    writer.close()
    with session_factory() as s:
        indexed = set(s.scalars(select(Instance.sop_instance_uid)))
    assert str(second.sop_instance_uid) not in indexed
    assert str(first.sop_instance_uid) in indexed  # taken before the timeout: committed later


def test_index_here_commits_on_the_calling_thread_when_the_writer_is_idle(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    writer = IndexWriter(session_factory)
    study, series = generate_uid(), generate_uid()
    threads: set[str] = set()
    real_write = writer._write

    def watch(batch: list[Any], **kwargs: Any) -> bool:
        threads.add(threading.current_thread().name)
        return real_write(batch, **kwargs)

    writer._write = watch  # type: ignore[method-assign]
    try:
        for n in range(3):
            stored = StoredFile(f"{n}.dcm", 1, f"{n:064x}", "1.2.840.10008.1.2.1", "A")
            assert writer.index_here(_header(study, series), stored, NOW) is IndexOutcome.NEW
    finally:
        writer.close()
    assert threads == {threading.current_thread().name}
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 3


def test_a_postgresql_lock_never_released_ends_index_here_in_an_error(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    session_factory = make_session_factory(engine)
    writer = IndexWriter(session_factory, lock_timeout_s=0.5)
    study, series = generate_uid(), generate_uid()
    stored = StoredFile("0.dcm", 1, "0" * 64, "1.2.840.10008.1.2.1", "A")
    assert writer.index_here(_header(study, series), stored, NOW) is IndexOutcome.NEW
    blocker = engine.connect()
    blocker.exec_driver_sql("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")  # held, never let go
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="lock timeout"):
            stored = StoredFile("1.dcm", 1, "1" * 64, "1.2.840.10008.1.2.1", "A")
            writer.index_here(_header(study, series), stored, NOW)
        assert time.monotonic() - started < 10
    finally:
        blocker.rollback()
        blocker.close()
        writer.close()
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_digest_here_reads_the_indexed_digest_on_the_idle_writers_connection(
    index_url: str,
) -> None:
    upgrade(index_url)
    engine = make_engine(index_url)
    writer = IndexWriter(make_session_factory(engine))
    study, series = generate_uid(), generate_uid()
    header = _header(study, series)
    try:
        assert writer.digest_here(str(header.sop_instance_uid)) is None
        stored = StoredFile("0.dcm", 1, "ab" * 32, "1.2.840.10008.1.2.1", "A")
        assert writer.index_here(header, stored, NOW) is IndexOutcome.NEW
        assert writer.digest_here(str(header.sop_instance_uid)) == "ab" * 32
        # No transaction is left open on the writer's connection: another writer can commit.
        with make_session_factory(engine).begin() as s:
            s.execute(text("UPDATE instances SET sha256 = :d"), {"d": "cd" * 32})
        assert writer.digest_here(str(header.sop_instance_uid)) == "cd" * 32
    finally:
        writer.close()
        engine.dispose()


def test_digest_here_says_so_while_the_writer_is_writing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    writer = IndexWriter(make_session_factory(make_engine(url)))
    try:
        with writer._busy, pytest.raises(WriterBusy):  # as while a batch is written
            writer.digest_here(generate_uid())
    finally:
        writer.close()
