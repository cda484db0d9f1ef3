"""Engine and session factory: the only place that knows backend quirks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

#: Execution option of a connection that only reads (SQLite then begins without the write lock).
READ_ONLY = "pacs_agent_read_only"


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and foreign keys on,
    so the listener's threads, the scheduler and workers can share one file."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event open the transaction (BEGIN IMMEDIATE below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(conn: Any) -> None:
            # Take the write lock at BEGIN: a deferred transaction that reads and then writes
            # can fail at once with "database is locked" instead of waiting its turn. A
            # connection marked read-only (the listener's lookups) opens no transaction: each
            # SELECT then reads in autocommit, takes no lock and holds no snapshot.
            if conn.get_execution_options().get(READ_ONLY):
                return
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def read_session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for reads only: on SQLite it takes no write lock (see READ_ONLY), so a
    periodic reader never holds up the listener's index writer."""
    with session_factory() as session:
        session.connection(execution_options={READ_ONLY: True})
        yield session
