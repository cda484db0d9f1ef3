"""The systemd units of a bare-metal install (deploy/systemd), checked by systemd itself.

``systemd-analyze verify`` loads each unit as systemd would (unknown keys, bad values, a
missing executable) and ``systemd-analyze security --offline`` scores its sandbox; neither
needs systemd running as PID 1. The units name /opt/pacs-agent/venv/bin/pacs-agent; the
copies checked here name this checkout's, so the check also proves the command exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.servers import require_services

UNITS = REPO / "deploy" / "systemd"
INSTALLED = "/opt/pacs-agent/venv/bin/pacs-agent"
SERVICES = [
    "pacs-agent.service",
    "pacs-agent-io.service",
    "pacs-agent-api.service",
    "pacs-agent-migrate.service",
    "pacs-agent-worker@cuda0.service",
]


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if require_services():
            pytest.fail(message)
        pytest.skip(message)
    return exe


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    here = str(Path(sys.executable).parent / "pacs-agent")
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, here))
    return tmp_path


def _directives(unit: str) -> dict[str, list[str]]:
    name = unit.replace("@cuda0", "@")
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_every_unit_passes_systemd_analyze_verify_without_a_warning(unit_dir: Path) -> None:
    units = [*SERVICES, "pacs-agent.target"]
    out = subprocess.run(
        [_systemd_analyze(), "verify", *units],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_each_service_is_sandboxed_to_an_exposure_of_at_most_2_5(unit: str, unit_dir: Path) -> None:
    out = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", unit],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert found is not None, out.stdout + out.stderr
    assert float(found[1]) <= 2.5, out.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_each_service_runs_as_its_own_user_and_writes_only_its_data_directory(
    unit: str,
) -> None:
    d = _directives(unit)
    assert d["User"] == ["pacs-agent"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["ProtectHome"] == ["yes"]
    assert d["ReadWritePaths"] == ["/var/lib/pacs-agent"]
    assert d["Environment"][-1] == "PACS_AGENT_DATA_DIR=/var/lib/pacs-agent"


@pytest.mark.parametrize(
    ("instance", "device"), [("cuda0", "cuda:0"), ("cuda12", "cuda:12"), ("cpu", "cpu")]
)
def test_the_worker_instance_name_selects_its_device(instance: str, device: str) -> None:
    """Runs the unit's own ExecStart line through sh, as systemd would after expanding %i
    and $$, with ``echo`` in place of pacs-agent."""
    (exec_start,) = _directives("pacs-agent-worker@.service")["ExecStart"]
    line = exec_start.replace("%i", instance).replace("$$", "$").replace(INSTALLED, "echo")
    argv = line.split(" ", 2)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2].strip("'")
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["worker", "--queues", "inference", "--device", device]
