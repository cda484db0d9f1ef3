"""A process with its own index writer, as one listener process has (tests only).

python tests/helpers/index_writer_child.py index URL START_AT FIRST COUNT STUDY SERIES
    Indexes instances FIRST..FIRST+COUNT-1 (SOP Instance UID ``<SERIES>.<n>``) from two
    threads once the clock reaches START_AT, then prints one line of JSON: each outcome.
python tests/helpers/index_writer_child.py hold URL
    Takes the index writers' process lock and SQLite's write lock (BEGIN IMMEDIATE),
    prints ``held`` and sleeps until killed.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pacs_agent.db.index import IndexWriter, StoredFile, process_lock_path
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.header import InstanceHeader


def index(url: str, start_at: float, first: int, count: int, study: str, series: str) -> None:
    writer = IndexWriter(make_session_factory(make_engine(url)))
    outcomes: dict[int, str] = {}
    now = datetime.now(UTC)

    def association(numbers: range) -> None:
        for n in numbers:
            header = InstanceHeader(
                study, series, f"{series}.{n}", "1.2.840.10008.5.1.4.1.1.2",
                "CT", None, None, None, None, None, None, 1, n,
            )  # fmt: skip
            stored = StoredFile(f"{n}.dcm", 1, f"{n:064x}", "1.2.840.10008.1.2.1", "A")
            try:
                outcomes[n] = str(writer.index_here(header, stored, now))
            except Exception as exc:  # reported, not hidden: the test asserts on it
                outcomes[n] = f"error: {type(exc).__name__}: {exc}"

    threads = [
        threading.Thread(target=association, args=(range(first + t, first + count, 2),))
        for t in range(2)
    ]
    time.sleep(max(0.0, start_at - time.time()))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    print(json.dumps(outcomes))


def hold(url: str) -> None:
    session_factory = make_session_factory(make_engine(url))
    lock = process_lock_path(session_factory)
    assert lock is not None
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    conn = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("held", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    if sys.argv[1] == "index":
        a = sys.argv[2:]
        index(a[0], float(a[1]), int(a[2]), int(a[3]), a[4], a[5])
    else:
        hold(sys.argv[2])
