"""ListenerProcesses.check with real child processes that exit at once: restarted, and a child
that keeps dying ends the service."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pacs_agent.config import ListenerSettings
from pacs_agent.listeners import MAX_DEATHS, ListenerFailed, ListenerProcesses
from pacs_agent.storage.spool import Spool


class _Dying(ListenerProcesses):
    """Children that exit with status 3 as soon as they start (a listener that cannot start)."""

    def command(self, index: int, index_fd: int | None = None) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(3)"]


def test_a_child_that_keeps_dying_is_restarted_then_stops_the_service(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    settings = ListenerSettings(port=sock.getsockname()[1], processes=2)
    processes = _Dying(settings, Spool(tmp_path), None, sock)
    processes.start()
    first = processes.pids()
    assert len(first) == 2
    for child in processes.children:
        child.proc.wait(30)
    (tmp_path / ".incoming").mkdir()
    left = tmp_path / ".incoming" / f"{first[0]}-0.ahead"
    left.write_bytes(b"")
    processes.check(now=0.0)
    assert not left.exists()  # the dead child's file made ahead is removed
    assert set(processes.pids()).isdisjoint(first)  # both restarted
    with pytest.raises(ListenerFailed, match="died 5 times within 60 s"):
        for n in range(1, MAX_DEATHS):
            for child in processes.children:
                child.proc.wait(30)
            processes.check(now=float(n))
    processes.stop()


def test_deaths_further_apart_than_the_window_do_not_stop_the_service(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    settings = ListenerSettings(port=sock.getsockname()[1], processes=2)
    processes = _Dying(settings, Spool(tmp_path), None, sock)
    processes.start()
    for n in range(MAX_DEATHS * 2):
        for child in processes.children:
            child.proc.wait(30)
        processes.check(now=n * 61.0)
    processes.stop()
