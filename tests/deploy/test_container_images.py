"""The Dockerfile and the compose file, checked with the real tools, without a Docker engine.

hadolint lints the Dockerfile; the Docker Compose CLI (``docker-compose``, pinned in
requirements.lock) resolves and validates the compose file as ``docker compose config``
does, for each profile. Building the images and ``docker compose up`` need a Docker engine,
which CI does not have (docs/deployment.md says what ran where).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.config import Settings
from tests.helpers.paths import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
AGENT_SERVICES = ["migrate", "listener", "worker-gpu", "worker-cpu", "worker-io", "demo"]


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is missing: it is pinned in requirements.lock (make venv)")
    return exe


def _compose(*args: str, profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [_tool("docker-compose"), "--project-directory", str(DEPLOY)]
    cmd += ["-f", str(DEPLOY / "compose.yaml")]
    for p in profiles:
        cmd += ["--profile", p]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )


def _config(*profiles: str) -> dict[str, Any]:
    out = _compose("config", "--format", "json", profiles=profiles)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def test_the_dockerfile_passes_hadolint_with_no_finding_at_all() -> None:
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_every_image_runs_as_the_unprivileged_user_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    finals = {s.split(" AS ")[1].split()[0]: s for s in stages if " AS " in s.splitlines()[0]}
    for target in ("listener", "worker-cpu", "worker-cuda"):
        stage = finals[target]
        assert "\nUSER 10001:10001\n" in stage, target
        assert "\nHEALTHCHECK " in stage, target
        assert 'VOLUME ["/var/lib/pacs-agent"]' in stage or target != "worker-cuda", target
    assert 'VOLUME ["/var/lib/pacs-agent"]' in finals["runtime-base"]
    # The listener's environment is built without torch, and the build checks it.
    assert "find_spec('torch') is not None" in finals["build"]
    assert "pytorch/pytorch:" in text and "-runtime" in text


@pytest.mark.parametrize("profiles", [("gpu",), ("cpu",), ("cpu", "demo")])
def test_the_compose_file_is_valid_for_each_profile(profiles: tuple[str, ...]) -> None:
    out = _compose("config", "--quiet", profiles=profiles)
    assert out.returncode == 0, out.stderr


def test_the_gpu_worker_reserves_a_gpu_and_the_cpu_worker_is_its_fallback_profile() -> None:
    gpu = _config("gpu")["services"]
    assert "worker-cpu" not in gpu
    (device,) = gpu["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    cpu = _config("cpu")["services"]
    assert "worker-gpu" not in cpu
    assert cpu["worker-cpu"]["build"]["target"] == "worker-cpu"
    assert cpu["worker-io"]["command"] == ["worker", "--queues", "io"]


def test_compose_services_take_only_settings_that_exist() -> None:
    """Every PACS_AGENT_* variable of every service loads into the settings object."""
    services = _config("cpu", "gpu", "demo")["services"]
    for name in AGENT_SERVICES:
        env = services[name]["environment"]
        agent_env = {k: v for k, v in env.items() if k.startswith("PACS_AGENT_")}
        assert agent_env["PACS_AGENT_DATABASE__URL"].startswith("postgresql+psycopg://")
        known = {k for k in agent_env if not k.startswith("PACS_AGENT_API__")}
        nested: dict[str, Any] = {}
        for key in known:
            path = key.removeprefix("PACS_AGENT_").lower().split("__")
            node = nested
            for part in path[:-1]:
                node = node.setdefault(part, {})
            value = agent_env[key]
            node[path[-1]] = json.loads(value) if value.startswith("[") else value
        Settings.model_validate(nested)  # extra keys are an error


def test_the_listener_publishes_the_dicom_port_and_starts_after_the_migration() -> None:
    listener = _config("cpu")["services"]["listener"]
    published = {(p["target"], p.get("published")) for p in listener["ports"]}
    assert (11112, "11112") in published
    assert listener["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert listener["environment"]["PACS_AGENT_DATABASE__AUTO_UPGRADE"] == "false"


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    """.dockerignore excludes everything but what the images copy (never .venv or var/)."""
    rules = (REPO / ".dockerignore").read_text().splitlines()
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert "*" in rules
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert src in kept, f"{src} is copied but excluded by .dockerignore"
        assert (REPO / src).exists(), src
