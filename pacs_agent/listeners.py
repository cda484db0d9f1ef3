"""Several listener processes on one port (``listener.processes`` > 1, decision 0013).

``serve`` opens the listening socket itself and starts N child processes
(``python -m pacs_agent.listeners``) that inherit it and accept from it: the kernel hands
each new connection to one of them, and a child that dies leaves the socket, and the
connections waiting on it, to the others while it is restarted. Each child is a whole
listener (``start_listener``): its own association threads, spool writer with its own files
made ahead, index writer (on SQLite the one in the parent that all children share over a
socket pair each, decision 0024) and duplicate lookup on its own database connections. The
scheduler, the embedded worker and the database upgrade stay in the parent, exactly once.
Like the parent, a child never imports torch or MONAI (invariant 4).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pacs_agent.config import ListenerSettings
from pacs_agent.db.index import IndexWriter
from pacs_agent.db.shared_index import serve_rows
from pacs_agent.storage.spool import Spool

log = logging.getLogger("pacs_agent.listeners")  # also when run as __main__

#: A child that dies this many times within ``CRASH_WINDOW_S`` ends the service (exit 1).
MAX_DEATHS = 5
CRASH_WINDOW_S = 60.0


class ListenerFailed(RuntimeError):
    """The listener processes keep dying: the service stops, visibly, instead of limping."""


def listening_socket(settings: ListenerSettings) -> socket.socket:
    """The socket the listener processes share (raises OSError when the port is taken)."""
    sock = socket.create_server((settings.host, settings.port), backlog=128)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    deaths: deque[float] = field(default_factory=deque)


class ListenerProcesses:
    """Starts, watches and stops the listener children of ``serve``."""

    def __init__(
        self,
        settings: ListenerSettings,
        spool: Spool,
        config_file: Path | None,
        sock: socket.socket,
        writer: IndexWriter | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.config_file = config_file
        self.sock = sock
        #: The index writer all children share (SQLite, decision 0024); None: each has its own.
        self.writer = writer
        self.children: list[_Child] = []

    def command(self, index: int, index_fd: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "pacs_agent.listeners", "--fd", str(self.sock.fileno())]
        cmd += ["--index", str(index), "--of", str(self.settings.processes)]
        if index_fd is not None:
            cmd += ["--index-fd", str(index_fd)]
        if self.config_file is not None:
            cmd += ["--config", str(self.config_file)]
        return cmd

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        # Its own process group: a Ctrl-C at a terminal reaches the parent alone, which stops
        # the children in order.
        fds = [self.sock.fileno()]
        ours = theirs = None
        if self.writer is not None:  # a fresh channel to the shared writer for each start
            ours, theirs = socket.socketpair()
            fds.append(theirs.fileno())
        try:
            proc = subprocess.Popen(
                self.command(index, theirs.fileno() if theirs is not None else None),
                pass_fds=fds,
                env=os.environ.copy(),
                process_group=0,
            )
        except BaseException:
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            raise
        if ours is not None and theirs is not None and self.writer is not None:
            theirs.close()  # the child's copy is its own now
            serve_rows(self.writer, ours, f"listener process {index}")
        log.info(
            "listener process %d of %d started (pid %d)", index, self.settings.processes, proc.pid
        )
        return proc

    def start(self) -> None:
        for index in range(1, self.settings.processes + 1):
            self.children.append(_Child(index, self._spawn(index)))

    def pids(self) -> list[int]:
        return [child.proc.pid for child in self.children]

    def check(self, now: float | None = None) -> None:
        """Restart a child that exited; raise ListenerFailed when one keeps dying.

        What a dead child had half-written in ``.incoming`` is removed (never answered
        success, so never acknowledged to a sender); its acknowledged instances are durable
        and indexed already (invariant 1).
        """
        now = time.monotonic() if now is None else now
        for child in self.children:
            code = child.proc.poll()
            if code is None:
                continue
            removed = self.spool.clear_incoming(child.proc.pid)
            log.error(
                "listener process %d (pid %d) exited with %s; %d half-received files removed",
                child.index,
                child.proc.pid,
                code,
                removed,
            )
            child.deaths.append(now)
            while child.deaths and now - child.deaths[0] > CRASH_WINDOW_S:
                child.deaths.popleft()
            if len(child.deaths) >= MAX_DEATHS:
                raise ListenerFailed(
                    f"listener process {child.index} died {len(child.deaths)} times within "
                    f"{CRASH_WINDOW_S:.0f} s (last exit status {code})"
                )
            child.proc = self._spawn(child.index)

    def stop(self, timeout_s: float = 35.0) -> None:
        """SIGTERM every child (each ends its associations and waits for its index rows),
        wait for them, SIGKILL what is left; then close the socket and the shared writer."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("listener process %d (pid %d) killed", child.index, child.proc.pid)
                child.proc.kill()
                child.proc.wait()
        self.sock.close()
        if self.writer is not None:  # every child is gone: nothing more to commit for them
            self.writer.close()


def child_main(argv: list[str] | None = None) -> int:
    """One listener process: accept on the inherited socket until SIGTERM, SIGINT or the
    parent's death (then the association threads are ended and the index flushed)."""
    parser = argparse.ArgumentParser(prog="pacs_agent.listeners")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--index-fd", type=int, default=None, help="channel to the shared writer")
    args = parser.parse_args(argv)
    parent = os.getppid()

    from pacs_agent.cli.common import setup_logging
    from pacs_agent.config import load_settings
    from pacs_agent.db.session import make_engine, make_session_factory
    from pacs_agent.net.scp import receiver_for, start_listener

    settings = load_settings(args.config)
    setup_logging(settings)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sock = socket.socket(fileno=args.fd)
    receiver = receiver_for(settings, make_session_factory(make_engine(settings.database_url)))
    if args.index_fd is not None:
        from pacs_agent.db.shared_index import SharedWriterClient

        receiver.writer = SharedWriterClient(socket.socket(fileno=args.index_fd))
    running = start_listener(settings.listener, receiver, sock=sock)
    log.info("listener process %d of %d ready (pid %d)", args.index, args.of, os.getpid())
    code = 0
    try:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                log.error("listener process %d: serve (pid %d) is gone", args.index, parent)
                break
            lost = getattr(receiver.writer, "lost", None)
            if lost is not None:  # every C-STORE would fail: exit, serve starts a new one
                log.error("listener process %d: shared index writer lost (%s)", args.index, lost)
                code = 1
                break
    finally:
        running.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(child_main())
