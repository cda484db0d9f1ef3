"""Invariant 4: the listener process never imports torch or MONAI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import Agent, free_port

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
