"""The index writers of several processes on one database (``listener.processes`` N): on a
SQLite file they take turns on a process lock beside it (decision 0024), which wakes the next
writer at once, is given back on errors and is released by the kernel when its holder dies."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_agent.db.index import (
    IndexOutcome,
    IndexTimeout,
    IndexWriter,
    StoredFile,
    process_lock_path,
)
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.header import InstanceHeader

pytestmark = pytest.mark.integration

CHILD = Path(__file__).resolve().parents[1] / "helpers" / "index_writer_child.py"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _header(study: str, series: str, sop: str | None = None) -> InstanceHeader:
    return InstanceHeader(
        study, series, sop or generate_uid(), "1.2.840.10008.5.1.4.1.1.2",
        "CT", None, None, None, None, None, None, 1, 1,
    )  # fmt: skip


def _stored(n: int, *, unwritable: bool = False) -> StoredFile:
    path = None if unwritable else f"{n}.dcm"  # NOT NULL: a row without it cannot be written
    return StoredFile(path, 1, f"{n:064x}", "1.2.840.10008.1.2.1", "A")  # type: ignore[arg-type]


def _lock_is_free(lock: str) -> bool:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also gives the lock back
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_four_processes_index_overlapping_instances_once_each(index_url: str) -> None:
    """Four writers in four processes, started together on one study and series; each
    instance is sent by two of them (as two senders of one study may): every instance ends
    up indexed exactly once, one process answered NEW and the other DUPLICATE."""
    upgrade(index_url)
    study = generate_uid()
    series = f"1.2.826.0.1.3680043.10.1012.{uuid.uuid4().int % 10**12}"  # room for ".<n>"
    start_at = time.time() + 3.0  # every child imported and connected by then
    # Processes 0 and 1 send instances 0..59, processes 2 and 3 send 40..99: 40..59 by all four.
    ranges = [(0, 60), (0, 60), (40, 60), (40, 60)]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                "index",
                index_url,
                repr(start_at),
                str(first),
                str(count),
                study,
                series,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first, count in ranges
    ]
    outcomes: dict[int, list[str]] = {}
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        for n, outcome in json.loads(out.strip().splitlines()[-1]).items():
            outcomes.setdefault(int(n), []).append(outcome)
    assert sorted(outcomes) == list(range(100))
    for n, got in outcomes.items():
        assert not [o for o in got if o.startswith("error")], (n, got)
        assert got.count(IndexOutcome.NEW) == 1, (n, got)  # the others: DUPLICATE
    session_factory = make_session_factory(engine := make_engine(index_url))
    try:
        with session_factory() as s:
            sops = s.scalars(select(Instance.sop_instance_uid)).all()
            assert sorted(sops) == sorted(f"{series}.{n}" for n in range(100))
            assert s.scalar(select(func.count(Series.id))) == 1
            assert s.scalar(select(func.count(Study.id))) == 1
    finally:
        engine.dispose()
    if index_url.startswith("sqlite"):
        lock = process_lock_path(session_factory)
        assert lock is not None and Path(lock).exists()  # the turns were taken on it


def test_the_process_lock_is_given_back_when_a_row_fails(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    writer = IndexWriter(session_factory)
    lock = writer.process_lock
    assert lock == f"{tmp_path / 'index.db'}-writer.lock"
    study, series = generate_uid(), generate_uid()
    try:
        assert writer.index_here(_header(study, series), _stored(1), NOW) is IndexOutcome.NEW
        assert _lock_is_free(lock)
        with pytest.raises(Exception, match="NOT NULL"):  # on the calling thread
            writer.index_here(_header(study, series), _stored(2, unwritable=True), NOW)
        assert _lock_is_free(lock)
        with pytest.raises(Exception, match="NOT NULL"):  # and through the writer's thread
            writer.index(_header(study, series), _stored(3, unwritable=True), NOW)
        assert _lock_is_free(lock)
        assert writer.index(_header(study, series), _stored(4), NOW) is IndexOutcome.NEW
    finally:
        writer.close()
    assert writer.stats.rows == 2 and writer.stats.commits == 2  # the failed rows not counted


def test_a_process_killed_holding_the_turn_does_not_block_the_other_writers(
    tmp_path: Path,
) -> None:
    """A listener process killed between BEGIN IMMEDIATE and COMMIT: while it holds the turn
    the others wait (a C-STORE ends in IndexTimeout, never in success); once the kernel has
    released its locks the waiting row commits and the next ones go straight through."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    holder = subprocess.Popen(
        [sys.executable, str(CHILD), "hold", url], stdout=subprocess.PIPE, text=True
    )
    session_factory = make_session_factory(make_engine(url))
    writer = IndexWriter(session_factory, timeout_s=1.0)
    study, series = generate_uid(), generate_uid()
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiting = _header(study, series)
        with pytest.raises(IndexTimeout) as timed_out:
            writer.index_here(waiting, _stored(1), NOW)  # not on this thread: on the writer's
        assert not timed_out.value.cancelled  # the writer holds it, waiting for its turn
        holder.kill()
        holder.wait(10)
        started = time.monotonic()
        assert writer.index_here(_header(study, series), _stored(2), NOW) in (IndexOutcome.NEW,)
        assert time.monotonic() - started < 5  # not SQLite's 30 s busy timeout
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        writer.close()
    with session_factory() as s:
        sops = set(s.scalars(select(Instance.sop_instance_uid)).all())
    assert waiting.sop_instance_uid in sops  # the row that waited was written, once
    assert len(sops) == 2


def test_postgresql_and_in_memory_sqlite_take_no_process_lock() -> None:
    for url in ("postgresql+psycopg://postgres@127.0.0.1:5432/test", "sqlite://"):
        engine = make_engine(url)
        try:
            assert process_lock_path(make_session_factory(engine)) is None
        finally:
            engine.dispose()
