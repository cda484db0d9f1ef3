"""The compose demo command (deploy/compose/send-demo-study.py), run against real servers.

Docker cannot run here, so the script runs as the compose ``demo`` service would run it, with
the same kind of settings, against a real Orthanc (the demo PACS) and ``pacs-agent serve``
on loopback: Orthanc sends the study, the agent's findings are printed, the SEG and SR are back
in Orthanc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import REPO, Agent, Orthanc, free_port

pytestmark = pytest.mark.integration

SCRIPT = REPO / "deploy" / "compose" / "send-demo-study.py"


def test_the_demo_command_sends_a_study_through_orthanc_and_prints_the_finding(
    tmp_path: Path,
) -> None:
    agent_port = free_port()
    orthanc = Orthanc(
        workdir=tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        modalities={"pacs-agent": ["PACSAGENT", "127.0.0.1", agent_port]},
    )
    destinations = [
        {"name": "demo-pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 0},
    ]
    orthanc.start()
    try:
        destinations[0]["port"] = orthanc.dicom_port
        agent = Agent(
            workdir=tmp_path / "agent",
            port=agent_port,
            env_overrides={"PACS_AGENT_EXPORT__DESTINATIONS": json.dumps(destinations)},
        )
        agent.start()
        try:
            env = {
                **agent.env(),
                "DEMO_ORTHANC_URL": orthanc.url,
                "DEMO_ORTHANC_MODALITY": "pacs-agent",
                "DEMO_TIMEOUT_S": "240",
            }
            out = subprocess.run(
                [sys.executable, str(SCRIPT)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            agent.stop()
    finally:
        orthanc.stop()
    assert out.returncode == 0, out.stdout + out.stderr + agent.log_tail()
    assert "finding: " in out.stdout
    assert ": exported" in out.stdout
    assert "the demo PACS now holds series of modality CT, SEG, SR" in out.stdout
