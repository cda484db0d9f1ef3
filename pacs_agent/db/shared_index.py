"""One index writer shared by the listener processes (``listener.processes`` N on SQLite,
decision 0024): rows from every process share commits, as the associations of one process do.

``serve`` keeps an ``IndexWriter`` and gives each listener process one end of a socket pair
(inherited like the listening socket); ``serve_rows`` answers that process's rows from the
writer's group commit. A listener process's ``SharedWriterClient`` sends each row as one
line of JSON with a request number and waits for the line that answers it, so its
associations' rows are in flight together. Nothing but the two ends of a pair can reach the
channel (no name in the filesystem or the network), and it carries only data (JSON).

A C-STORE is answered success only after its answer line says the row committed (invariant
1). When the channel breaks, every row in flight fails with ``WriterLost`` (it may still
commit: the listener keeps its file) and later rows fail at once; ``serve`` restarts a
listener process that dies, with a new pair.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import socket
import struct
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from datetime import datetime
from typing import Any

from pacs_agent.db.index import (
    IndexOutcome,
    IndexTimeout,
    IndexWriter,
    StoredFile,
    WriterBusy,
    WriterLost,
)
from pacs_agent.dicom.header import InstanceHeader

log = logging.getLogger(__name__)


class SharedIndexError(Exception):
    """The shared writer could not commit this row (it did not commit)."""


def serve_rows(writer: IndexWriter, channel: socket.socket, name: str) -> threading.Thread:
    """Answer the rows a listener process sends over ``channel`` from ``writer``, on a thread
    that ends (closing the channel) when the process's end closes."""

    send_lock = threading.Lock()
    # Answers are sent from the writer's thread: a listener process that stops reading (stopped,
    # not dead) must not hold up every other process's commits. After 5 s its answer is
    # dropped and the channel ended: its rows in flight fail as "may still commit", never as
    # success, and the process exits to be restarted with a new channel.
    channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))

    def answer(number: int, future: Future[IndexOutcome]) -> None:
        reply: dict[str, Any] = {"n": number}
        try:
            reply["outcome"] = future.result().value
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        data = (json.dumps(reply) + "\n").encode()
        with send_lock:
            try:
                channel.sendall(data)
            except OSError:  # gone, or not reading: end the channel (it then restarts)
                with contextlib.suppress(OSError):
                    channel.shutdown(socket.SHUT_RDWR)

    def run() -> None:
        with channel, channel.makefile("rb") as lines:
            for line in lines:
                try:
                    message = json.loads(line)
                    header = InstanceHeader(**message["header"])
                    stored = StoredFile(**message["stored"])
                    now = datetime.fromisoformat(message["now"])
                    number = int(message["n"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("shared index writer: unreadable row from %s: %s", name, exc)
                    return
                request = writer.submit(header, stored, now, reopen=bool(message["reopen"]))
                request.future.add_done_callback(functools.partial(answer, number))

    thread = threading.Thread(target=run, name=f"index-rows-{name}", daemon=True)
    thread.start()
    return thread


class SharedWriterClient:
    """The listener process's side: ``index`` sends a row to the shared writer and waits for
    its answer (``RowWriter``)."""

    def __init__(self, channel: socket.socket, timeout_s: float = 120.0) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self._numbers = itertools.count(1)
        self._pending: dict[int, Future[IndexOutcome]] = {}
        self._lock = threading.Lock()  # guards _pending, _lost and the sending side
        self._lost: str | None = None
        self._reader = threading.Thread(target=self._read, name="index-answers", daemon=True)
        self._reader.start()

    def index(
        self, header: InstanceHeader, stored: StoredFile, now: datetime, *, reopen: bool = True
    ) -> IndexOutcome:
        future: Future[IndexOutcome] = Future()
        message = {
            "header": asdict(header),
            "stored": asdict(stored),
            "now": now.isoformat(),
            "reopen": reopen,
        }
        with self._lock:
            if self._lost is not None:
                raise SharedIndexError(f"the shared index writer is gone ({self._lost})")
            number = next(self._numbers)
            message["n"] = number
            self._pending[number] = future
            try:
                self.channel.sendall((json.dumps(message) + "\n").encode())
            except OSError as exc:
                del self._pending[number]  # not sent whole: the writer cannot commit it
                self._lose(f"send failed: {exc}")
                raise SharedIndexError(f"the shared index writer is gone ({exc})") from exc
        try:
            return future.result(timeout=self.timeout_s)
        except WriterLost:  # a TimeoutError too (as IndexTimeout): not the wait's own timeout
            raise
        except FutureTimeout as exc:
            with self._lock:
                self._pending.pop(number, None)
            raise IndexTimeout(self.timeout_s, cancelled=False) from exc

    def index_here(
        self, header: InstanceHeader, stored: StoredFile, now: datetime, *, reopen: bool = True
    ) -> IndexOutcome:
        return self.index(header, stored, now, reopen=reopen)

    @property
    def lost(self) -> str | None:
        """Why the channel to the shared writer ended (None: it has not)."""
        return self._lost

    def digest_here(self, sop_uid: str) -> str | None:
        raise WriterBusy()  # no writer connection here: the caller reads the index itself

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)
        self._reader.join(10)
        self.channel.close()

    def _read(self) -> None:
        reason = "closed"
        try:
            with self.channel.makefile("rb") as lines:
                for line in lines:
                    answer = json.loads(line)
                    with self._lock:
                        future = self._pending.pop(int(answer["n"]), None)
                    if future is None:  # its C-STORE timed out meanwhile
                        continue
                    if "error" in answer:
                        future.set_exception(SharedIndexError(str(answer["error"])))
                    else:
                        future.set_result(IndexOutcome(answer["outcome"]))
        except (OSError, ValueError, KeyError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._lose(reason)

    def _lose(self, reason: str) -> None:
        """Under ``_lock``: fail every row in flight (each may still commit)."""
        if self._lost is None:
            self._lost = reason
        for future in self._pending.values():
            future.set_exception(WriterLost(reason))
        self._pending.clear()
