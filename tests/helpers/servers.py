"""Real servers for tests: Orthanc as the PACS, pacs-agent serve, PostgreSQL databases.

Every server listens on a free loopback port chosen per test; nothing here is a stand-in.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.paths import REPO as REPO  # re-exported: tests import it from here


def require_services() -> bool:
    """In CI a missing server fails the test instead of skipping it."""
    return os.environ.get("CI", "") not in ("", "0", "false") or bool(
        os.environ.get("PACS_AGENT_REQUIRE_SERVICES")
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Orthanc:
    """A real Orthanc PACS on loopback ports."""

    workdir: Path
    dicom_port: int
    http_port: int
    aet: str = "ORTHANC"
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    #: Load the DICOMweb plugin (Debian package orthanc-dicomweb) at ``dicomweb_url``.
    dicomweb: bool = False
    #: Extra keys of Orthanc's configuration (DICOM TLS, ...).
    extra_config: dict[str, Any] = field(default_factory=dict)
    #: HTTP basic authentication (user, password): Orthanc then refuses anonymous requests.
    http_user: tuple[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-agent-test",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.http_user is not None,
            "RegisteredUsers": dict([self.http_user]) if self.http_user else {},
            "DicomModalities": self.modalities,
            "DicomScpTimeout": 30,
            "StableAge": 1,
            "HttpTimeout": 60,
            **self.extra_config,
        }
        if self.dicomweb:
            plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
            if not plugin.exists():
                raise RuntimeError("Orthanc's DICOMweb plugin is missing (orthanc-dicomweb)")
            config["Plugins"] = [str(plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([exe, str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._alive(), 30, "Orthanc to answer HTTP")

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Content-Type": content_type}
        if self.http_user is not None:
            token = base64.b64encode(f"{self.http_user[0]}:{self.http_user[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            data = rsp.read()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> Any:
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")


@dataclass
class Agent:
    """``pacs-agent serve`` as a subprocess, with its own data directory and ports."""

    workdir: Path
    port: int
    ae_title: str = "PACSAGENT"
    #: Loopback address the listener binds (127.0.0.2 stands for another host).
    host: str = "127.0.0.1"
    env_overrides: dict[str, str] = field(default_factory=dict)
    config_toml: str = ""
    with_worker: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "var"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        env.update(
            {
                "PACS_AGENT_DATA_DIR": str(self.data_dir),
                "PACS_AGENT_LISTENER__HOST": self.host,
                "PACS_AGENT_LISTENER__PORT": str(self.port),
                "PACS_AGENT_LISTENER__AE_TITLE": self.ae_title,
                "PACS_AGENT_ASSEMBLER__IDLE_TIMEOUT_S": "1",
                "PACS_AGENT_ASSEMBLER__POLL_INTERVAL_S": "0.2",
                "PACS_AGENT_WORKER__DEVICE": "cpu",
                # serve also runs the HTTP API: never on the default port, which another
                # test's agent (or anything on the machine) may hold.
                "PACS_AGENT_API__PORT": str(free_port()),
            }
        )
        env.update(self.env_overrides)
        if self.config_toml:
            cfg = self.workdir / "pacs-agent.toml"
            cfg.write_text(self.config_toml)
            env["PACS_AGENT_CONFIG"] = str(cfg)
        return env

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pacs_agent", "serve"]
        if not self.with_worker:
            cmd.append("--no-worker")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        wait_for(self._listening, 60, "pacs-agent to answer C-ECHO")

    def _listening(self) -> bool:
        from pacs_agent.net.scu import echo

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"pacs-agent exited:\n{self.log_path.read_text()[-4000:]}")
        return (
            echo(
                host=self.host,
                port=self.port,
                called_ae=self.ae_title,
                calling_ae="TESTSCU",
                timeout_s=2,
            )
            == 0
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


POSTGRES_ADMIN_URL = os.environ.get(
    "PACS_AGENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def orthanc_and_agent(workdir: Path) -> Iterator[tuple[Orthanc, Agent]]:
    """Orthanc as the PACS (it knows the agent as modality ``agent``, so it can push studies to
    it) and ``pacs-agent serve`` exporting its results back to that Orthanc; both stopped
    afterwards."""
    agent_port = free_port()
    orthanc = Orthanc(
        workdir=workdir / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        modalities={"agent": ["PACSAGENT", "127.0.0.1", agent_port]},
    )
    orthanc.start()
    destination = {
        "name": "orthanc",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }
    agent = Agent(
        workdir=workdir / "agent",
        port=agent_port,
        env_overrides={"PACS_AGENT_EXPORT__DESTINATIONS": json.dumps([destination])},
    )
    try:
        agent.start()
        yield orthanc, agent
    finally:
        agent.stop()
        orthanc.stop()


@contextlib.contextmanager
def postgres_database(prefix: str = "pacs_agent_test") -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False
