"""Invariant 4: the listener process never imports torch or MONAI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import Agent, free_port, wait_for

pytestmark = pytest.mark.integration


def test_importing_every_service_module_loads_no_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, pacs_agent\n"
        "for m in pkgutil.walk_packages(pacs_agent.__path__, 'pacs_agent.'):\n"
        "    if m.name != 'pacs_agent.__main__': importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'monai', 'workers'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_running_serve_process_has_not_loaded_torch(tmp_path: Path) -> None:
    """Looks at the live process's memory map: no libtorch, no torch or monai package."""
    agent = Agent(workdir=tmp_path, port=free_port(), with_worker=False)
    agent.start()
    try:
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        loaded = [
            line
            for line in maps.splitlines()
            if "libtorch" in line or "/torch/" in line or "/monai/" in line
        ]
        assert loaded == []
        assert "pynetdicom" in maps or "site-packages" in maps  # a Python process, mapped
    finally:
        agent.stop()


def test_listener_processes_of_serve_have_not_loaded_torch(tmp_path: Path) -> None:
    """With ``listener.processes`` = 2 each listener child is checked the same way."""
    agent = Agent(
        workdir=tmp_path,
        port=free_port(),
        with_worker=False,
        env_overrides={"PACS_AGENT_LISTENER__PROCESSES": "2"},
    )
    agent.start()
    try:
        ready = re.compile(r"listener process \d of 2 ready \(pid (\d+)\)")
        pids = wait_for(
            lambda: (found := ready.findall(agent.log_tail(10**6))) and len(found) >= 2 and found,
            90,
            "two listener processes",
        )
        for pid in pids:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert not [
                line
                for line in maps.splitlines()
                if "libtorch" in line or "/torch/" in line or "/monai/" in line
            ]
            assert "site-packages" in maps
    finally:
        agent.stop()
