"""The index: what was received, per study, series and instance."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Instance, InstanceCopy, Series, Study
from pacs_agent.db.session import READ_ONLY
from pacs_agent.dicom.header import InstanceHeader

log = logging.getLogger(__name__)


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


class DigestLookup:
    """The digest of the indexed instance with a SOP Instance UID (or None), read on one
    connection kept for an association's C-STOREs.

    Each read ends its transaction at once (no snapshot held between C-STOREs; on SQLite no
    write lock taken); the connection is dropped after any error, so the next C-STORE
    reconnects.
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self._conn: Connection | None = None

    def digest(self, sop_uid: str) -> str | None:
        if self._conn is None:
            bind = self.session_factory.kw["bind"]
            self._conn = bind.connect().execution_options(**{READ_ONLY: True})
        try:
            value = self._conn.scalar(_DIGEST, {"sop_uid": sop_uid})
            self._conn.rollback()
        except Exception:
            self.close()
            raise
        return str(value) if value is not None else None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a connection that is already gone
                self._conn.close()
            self._conn = None


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
                return index_rows(session.connection(), header, stored, now, reopen)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def index_rows(
    conn: Connection, header: InstanceHeader, stored: StoredFile, now: datetime, reopen: bool
) -> IndexOutcome:
    """The statements that index one instance, inside the caller's transaction (Core SQL:
    this runs once per received instance, so it stays off the ORM's unit of work)."""
    study = conn.execute(
        select(Study.id, Study.status).where(Study.study_instance_uid == header.study_instance_uid)
    ).first()
    if study is None:
        study_id = _insert_id(
            conn,
            insert(Study).values(
                study_instance_uid=header.study_instance_uid,
                patient_id=header.patient_id,
                accession_number=header.accession_number,
                study_date=header.study_date,
                study_description=header.study_description,
                status="receiving",
                first_received_at=now,
                last_received_at=now,
            ),
        )
        status = "receiving"
    else:
        study_id, status = int(study[0]), str(study[1])

    series_id = conn.scalar(
        select(Series.id).where(Series.series_instance_uid == header.series_instance_uid)
    )
    if series_id is None:
        series_id = _insert_id(
            conn,
            insert(Series).values(
                study_id=study_id,
                series_instance_uid=header.series_instance_uid,
                modality=header.modality,
                body_part_examined=header.body_part_examined,
                series_description=header.series_description,
                series_number=header.series_number,
                image_type=header.image_type,
                slice_thickness=header.slice_thickness,
            ),
        )

    instance = conn.execute(
        select(Instance.id, Instance.sha256).where(
            Instance.sop_instance_uid == header.sop_instance_uid
        )
    ).first()
    if instance is not None and instance[1] == stored.sha256:
        return IndexOutcome.DUPLICATE
    values = {
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": stored.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": stored.relative_path,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
        "calling_ae_title": stored.calling_ae_title,
        "received_at": now,
    }
    if instance is None:
        conn.execute(
            insert(Instance).values(
                sop_instance_uid=header.sop_instance_uid, series_id=series_id, **values
            )
        )
    else:
        conn.execute(update(Instance).where(Instance.id == instance[0]).values(**values))

    if status == "receiving":
        conn.execute(update(Study).where(Study.id == study_id).values(last_received_at=now))
    elif reopen:  # a late instance re-opens the study
        conn.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                status="receiving",
                first_received_at=now,
                last_received_at=now,
                completion=None,
                completed_at=None,
            )
        )
    return IndexOutcome.NEW if instance is None else IndexOutcome.REPLACED


def _insert_id(conn: Connection, statement: Any) -> int:
    key = conn.execute(statement).inserted_primary_key
    assert key is not None
    return int(key[0])


@dataclass
class _Request:
    header: InstanceHeader
    stored: StoredFile
    now: datetime
    reopen: bool
    future: Future[IndexOutcome] = field(default_factory=Future)


def process_lock_path(session_factory: sessionmaker[Session]) -> str | None:
    """The lock file that orders the index writers of all processes on one SQLite file
    (``<database>-writer.lock`` beside it); None for PostgreSQL and in-memory SQLite."""
    url = session_factory.kw["bind"].url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return f"{url.database}-writer.lock"


@dataclass
class WriterStats:
    """What one index writer did: committed batches, rows, and seconds waiting for the write
    turn (the other processes' commits) and holding it (statements and COMMIT)."""

    commits: int = 0
    rows: int = 0
    wait_s: float = 0.0
    hold_s: float = 0.0

    def count(self, rows: int, wait_s: float, hold_s: float) -> None:
        self.commits += 1
        self.rows += rows
        self.wait_s += wait_s
        self.hold_s += hold_s

    def __str__(self) -> str:
        per = self.rows / self.commits if self.commits else 0.0
        return (
            f"{self.rows} rows in {self.commits} commits ({per:.1f} per commit); "
            f"waited {self.wait_s:.3f} s for the write turn, held it {self.hold_s:.3f} s"
        )


class IndexTimeout(TimeoutError):
    """The index writer did not commit a row in time. ``cancelled``: the row was withdrawn
    and will never be written; otherwise it may still commit."""

    def __init__(self, timeout_s: float, *, cancelled: bool) -> None:
        state = "withdrawn" if cancelled else "may still commit"
        super().__init__(f"index row not committed within {timeout_s:g} s ({state})")
        self.cancelled = cancelled


class WriterLost(IndexTimeout):
    """The shared index writer went away with the row in hand: it may have committed."""

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, f"the shared index writer is gone ({reason}); the row may commit")
        self.cancelled = False


class RowWriter(Protocol):
    """What the listener needs of an index writer: this process's ``IndexWriter``, or the
    listener processes' shared one (``pacs_agent.db.shared_index.SharedWriterClient``)."""

    def index(
        self, header: InstanceHeader, stored: StoredFile, now: datetime, *, reopen: bool = True
    ) -> IndexOutcome: ...

    def index_here(
        self, header: InstanceHeader, stored: StoredFile, now: datetime, *, reopen: bool = True
    ) -> IndexOutcome: ...

    def digest_here(self, sop_uid: str) -> str | None: ...

    def close(self) -> None: ...


class WriterBusy(Exception):
    """The index writer is writing a batch at this moment."""


class IndexWriter:
    """Group commit: one thread writes the index rows of all waiting C-STOREs in one
    transaction, so concurrent associations share a commit.

    ``index()`` returns only after the row's transaction committed, or raises what failed.
    The thread keeps one connection and remembers the ids of the studies and series it
    indexed, so a new instance of a known series costs one INSERT and one UPDATE. Anything
    unexpected in a batch (a unique-key race, a replaced instance, a lost connection) makes
    it retry one instance per transaction through the full path (``index_instance``), so one
    bad instance fails alone and a stale cached id is never trusted twice.

    On a SQLite file index writers in separate processes (the listener processes share one
    in ``serve`` instead, ``pacs_agent.db.shared_index``) take turns on an OS lock next to
    the database (``process_lock``, decision 0024), held from
    before BEGIN IMMEDIATE until after COMMIT or ROLLBACK: a waiting writer wakes the moment
    the lock is released, where SQLite's busy handler sleeps 1, 2, 5, 10, ... ms between
    tries. The kernel releases it when its holder dies; the busy timeout stays as the fallback
    against every other writer (scheduler, workers). PostgreSQL needs no turn.
    """

    _CACHE_LIMIT = 4096

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        max_batch: int = 64,
        timeout_s: float = 120.0,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.session_factory = session_factory
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        #: How long one of the writer's statements waits for a lock another connection holds
        #: (PostgreSQL's lock_timeout; SQLite's busy timeout is the engine's, also 30 s).
        self.lock_timeout_s = lock_timeout_s
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._series: dict[str, tuple[int, int]] = {}  # series UID -> (study id, series id)
        self._busy = threading.Lock()  # held while a batch is written, by whichever thread
        self._digest_compiled: Any = None
        #: The file whose lock orders the index writers of all processes (None: no turn).
        self.process_lock = process_lock_path(session_factory)
        self._lock_fd: int | None = None
        #: Counted per writer, logged at close: commits, rows, and seconds spent waiting for
        #: the write turn (the process lock and BEGIN IMMEDIATE) and holding it.
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def index(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        now: datetime,
        *,
        reopen: bool = True,
    ) -> IndexOutcome:
        """Commit the row of an instance whose file and directory entry are durable."""
        request = self.submit(header, stored, now, reopen=reopen)
        # A database that hangs (a lock never released) must still end in 0xA700, not a
        # C-STORE that never gets its answer.
        try:
            return request.future.result(timeout=self.timeout_s)
        except FutureTimeout as exc:
            # Withdraw the row if the writer has not taken it yet; otherwise it may still
            # commit, and the caller must not treat the instance as unindexed.
            raise IndexTimeout(self.timeout_s, cancelled=request.future.cancel()) from exc

    def submit(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        now: datetime,
        *,
        reopen: bool = True,
    ) -> _Request:
        """Queue a row for the writer's thread without waiting: its ``future`` settles once
        the row's transaction committed or failed (the shared writer of the listener
        processes answers each process's rows from there)."""
        request = _Request(header, stored, now, reopen)
        self._queue.put(request)
        return request

    def index_here(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        now: datetime,
        *,
        reopen: bool = True,
    ) -> IndexOutcome:
        """Like ``index``, but when the writer is idle the row is committed on the calling
        thread, without the hand-over to the writer's thread and back (the listener does so
        when one C-STORE is under way alone: about a tenth of its time per instance).

        No timeout of its own: a lock another connection holds is waited for as long as the
        database lets a statement wait (``lock_timeout_s``), then the error is raised."""
        if not self._busy.acquire(blocking=False):
            return self.index(header, stored, now, reopen=reopen)
        request = _Request(header, stored, now, reopen)
        try:
            request.future.set_running_or_notify_cancel()
            written = self._write([request], wait=False)
        finally:
            self._busy.release()
        if not written:
            # Another process's turn: wait on the writer's thread, under index()'s timeout
            # (a holder that hangs must not keep this C-STORE from its answer).
            return self.index(header, stored, now, reopen=reopen)
        return request.future.result()

    def digest_here(self, sop_uid: str) -> str | None:
        """The indexed digest of ``sop_uid`` (None: not indexed), read on the writer's own
        connection while the writer is idle: its cache is current (no other connection wrote
        since), where a reader's cache is dropped after every commit. Raises WriterBusy when
        the writer is writing (the caller reads elsewhere)."""
        if not self._busy.acquire(blocking=False):
            raise WriterBusy()
        try:
            raw = self._connection().connection.dbapi_connection
            assert raw is not None
            sql, params = self._digest_sql(sop_uid)
            cursor = raw.cursor()
            try:
                cursor.execute(sql, params)
                row = cursor.fetchone()
            finally:
                cursor.close()
                raw.rollback()  # no transaction left open (SQLite here is in autocommit)
        except Exception:
            self._reset()
            raise
        finally:
            self._busy.release()
        return None if row is None else str(row[0])

    def _digest_sql(self, sop_uid: str) -> tuple[str, Any]:
        if self._digest_compiled is None:
            self._digest_compiled = _DIGEST.compile(dialect=self._connection().dialect)
        compiled = self._digest_compiled
        if compiled.positional:
            return str(compiled), (sop_uid,)
        return str(compiled), {"sop_uid": sop_uid}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
        self._reset()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        if self.stats.commits:
            log.info("index writer: %s", self.stats)

    def _take_turn(self, *, blocking: bool) -> bool:
        """The process lock, when there is one (True: held, or none needed). Blocking waits
        in the kernel, which wakes this writer when the holder releases it or dies."""
        if self.process_lock is None:
            return True
        if self._lock_fd is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._lock_fd = os.open(self.process_lock, flags, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def _give_turn(self) -> None:
        if self._lock_fd is None:
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except OSError:  # closing the descriptor gives the lock back too
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            # Rows withdrawn by a timed-out C-STORE are dropped; the rest can no longer be.
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if batch:
                with self._busy:
                    self._write(batch)
            if stop:
                return

    def _reset(self) -> None:
        self._series.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a connection that is already gone
                self._conn.invalidate()  # not back to the pool: it carries our lock_timeout
                self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None:
            bind = self.session_factory.kw["bind"]
            conn = bind.connect()
            if conn.dialect.name == "postgresql":  # a lock never released ends in an error
                conn.exec_driver_sql(f"SET lock_timeout = {int(self.lock_timeout_s * 1000)}")
                conn.commit()
            self._conn = conn
        return self._conn

    def _write(self, batch: list[_Request], *, wait: bool = True) -> bool:
        """Commit ``batch`` in this process's write turn and settle each request's future.
        The turn is given back before the futures are settled, also when anything failed.
        With ``wait`` False and the turn another process's, returns False at once and
        leaves the futures alone."""
        started = time.perf_counter()
        try:
            if not self._take_turn(blocking=wait):
                return False
        except Exception as exc:  # the lock file cannot be opened or locked
            results: list[IndexOutcome | BaseException] = [exc] * len(batch)
        else:
            try:
                results = self._write_in_turn(batch, started)
            finally:
                self._give_turn()
        for request, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
        return True

    def _write_in_turn(
        self, batch: list[_Request], started: float
    ) -> list[IndexOutcome | BaseException]:
        try:
            conn = self._connection()
            with conn.begin():
                locked = time.perf_counter()  # BEGIN IMMEDIATE returned: the write lock held
                outcomes = self._index_batch(conn, batch)
        except Exception:  # retried one by one below, through the full path
            self._reset()
        else:
            self.stats.count(len(batch), locked - started, time.perf_counter() - locked)
            return list(outcomes)
        results: list[IndexOutcome | BaseException] = []
        for request in batch:
            begun = time.perf_counter()
            try:
                results.append(self._index_one(request))
            except Exception as exc:
                results.append(exc)
            else:
                self.stats.count(1, 0.0, time.perf_counter() - begun)
        return results

    def _index_one(self, r: _Request) -> IndexOutcome:
        """One row in its own transaction through the full path, on the writer's own
        connection (so its lock timeout holds here too); once more after a unique-key race
        (two associations creating the same study at once)."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                with conn.begin():
                    return index_rows(conn, r.header, r.stored, r.now, r.reopen)
            except IntegrityError:
                if attempt == 2:
                    raise
            except Exception:
                self._reset()
                raise
        raise AssertionError("unreachable")

    def _index_batch(self, conn: Connection, batch: list[_Request]) -> list[IndexOutcome]:
        outcomes: list[IndexOutcome] = []
        rows: list[dict[str, Any]] = []
        touched: dict[int, _Request] = {}  # study id -> its latest request
        for r in batch:
            known = self._series.get(r.header.series_instance_uid)
            if known is None:  # first instance of a series here: the full path, then cache
                outcomes.append(index_rows(conn, r.header, r.stored, r.now, r.reopen))
                row = conn.execute(_SERIES_IDS, {"series_uid": r.header.series_instance_uid}).one()
                if len(self._series) >= self._CACHE_LIMIT:
                    self._series.clear()
                self._series[r.header.series_instance_uid] = (int(row[0]), int(row[1]))
                continue
            # A new instance of a known series (the usual case). An instance that exists
            # already makes the INSERT fail: the whole batch then takes the full path.
            study_id, series_id = known
            rows.append(_instance_row(r, series_id))
            touched[study_id] = r
            outcomes.append(IndexOutcome.NEW)
        if rows:
            conn.execute(_INSERT_INSTANCE, rows)
        for study_id, r in touched.items():
            moved = conn.execute(_TOUCH_STUDY, {"study_id": study_id, "now": r.now})
            if moved.rowcount != 1 and r.reopen:  # a late instance re-opens the study
                conn.execute(_REOPEN_STUDY, {"study_id": study_id, "now": r.now})
        return outcomes


# Built once: statements the writer runs for every instance (SQLAlchemy caches compiled forms).
_INSERT_INSTANCE = insert(Instance)
_SERIES_IDS = select(Series.study_id, Series.id).where(
    Series.series_instance_uid == bindparam("series_uid")
)
_TOUCH_STUDY = (
    update(Study)
    .where(Study.id == bindparam("study_id"), Study.status == "receiving")
    .values(last_received_at=bindparam("now"))
)
_REOPEN_STUDY = (
    update(Study)
    .where(Study.id == bindparam("study_id"))
    .values(
        status="receiving",
        first_received_at=bindparam("now"),
        last_received_at=bindparam("now"),
        completion=None,
        completed_at=None,
    )
)
_DIGEST = select(Instance.sha256).where(Instance.sop_instance_uid == bindparam("sop_uid"))


def _instance_row(r: _Request, series_id: int) -> dict[str, Any]:
    return {
        "sop_instance_uid": r.header.sop_instance_uid,
        "series_id": series_id,
        "sop_class_uid": r.header.sop_class_uid,
        "transfer_syntax_uid": r.stored.transfer_syntax_uid,
        "instance_number": r.header.instance_number,
        "path": r.stored.relative_path,
        "size_bytes": r.stored.size_bytes,
        "sha256": r.stored.sha256,
        "calling_ae_title": r.stored.calling_ae_title,
        "received_at": r.now,
    }


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
