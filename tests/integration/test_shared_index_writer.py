"""The index writer the listener processes share on SQLite (decision 0024): rows from every
process share commits, each process gets its own answers, and a channel that breaks fails
the rows in flight as "may still commit", never as success."""

from __future__ import annotations

import json
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_agent.db.index import IndexOutcome, IndexWriter, StoredFile, WriterLost
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.db.shared_index import SharedIndexError, SharedWriterClient, serve_rows
from pacs_agent.dicom.header import InstanceHeader

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _header(study: str, series: str) -> InstanceHeader:
    return InstanceHeader(
        study, series, generate_uid(), "1.2.840.10008.5.1.4.1.1.2",
        "CT", None, None, None, None, None, None, 1, 1,
    )  # fmt: skip


def _stored(n: int, *, unwritable: bool = False) -> StoredFile:
    path = None if unwritable else f"{n}.dcm"  # NOT NULL: a row without it cannot be written
    return StoredFile(path, 1, f"{n:064x}", "1.2.840.10008.1.2.1", "A")  # type: ignore[arg-type]


def test_rows_of_several_processes_share_commits_and_a_bad_one_fails_alone(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    writer = IndexWriter(session_factory)
    clients = []
    for name in ("a", "b", "c", "d"):  # four listener processes' channels
        ours, theirs = socket.socketpair()
        serve_rows(writer, ours, name)
        clients.append(SharedWriterClient(theirs, timeout_s=60))
    study, series = generate_uid(), generate_uid()
    results: dict[int, object] = {}
    start = threading.Barrier(16)

    def association(k: int) -> None:
        client = clients[k % 4]
        start.wait()
        for i in range(10):
            n = k * 10 + i
            try:
                results[n] = client.index(
                    _header(study, series), _stored(n, unwritable=n == 77), NOW
                )
            except Exception as exc:
                results[n] = exc

    threads = [threading.Thread(target=association, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for client in clients:
            client.close()
        writer.close()
    failed = results.pop(77)
    assert isinstance(failed, SharedIndexError) and "NOT NULL" in str(failed)
    assert set(results.values()) == {IndexOutcome.NEW} and len(results) == 159
    with session_factory() as s:
        assert s.scalar(select(func.count(Instance.id))) == 159
    assert writer.stats.rows == 159
    assert writer.stats.commits < writer.stats.rows  # rows of the four channels shared commits


def test_a_broken_channel_fails_the_rows_in_flight_as_may_still_commit() -> None:
    ours, theirs = socket.socketpair()
    client = SharedWriterClient(theirs, timeout_s=30)
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(client.index(_header("1.2.3", "1.2.3.4"), _stored(1), NOW))
        except Exception as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    with ours.makefile("rb") as lines:
        row = json.loads(lines.readline())  # the row is with the writer now
    assert (
        row["stored"]["relative_path"] == "1.dcm" and row["header"]["study_instance_uid"] == "1.2.3"
    )
    ours.close()  # the writer's side goes away before answering
    sender.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], WriterLost)
    assert not outcome[0].cancelled  # the listener keeps the file: the row may have committed
    assert client.lost is not None  # the listener process then exits and serve restarts it
    with pytest.raises(SharedIndexError, match="gone"):
        client.index(_header("1.2.3", "1.2.3.4"), _stored(2), NOW)
    client.close()
