"""Real pieces for the orchestration tests: brokers, worker processes, studies sent by dcmtk.

Shared brokers (the machine's Redis and RabbitMQ) are used with queue names unique to one
test, so parallel runs never take each other's messages. A broker a test stops is always a
private one it started itself on a free port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study
from tests.helpers.servers import REPO, Orthanc, free_port, require_services, wait_for

SHARED_REDIS = "redis://127.0.0.1:6379/0"
SHARED_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def shared_broker_url(kind: str) -> str | None:
    """The URL of the machine's broker of ``kind`` (None: the embedded broker).

    Fails in CI, skips elsewhere, when that server is not running."""
    if kind == "embedded":
        return None
    url, port = {"redis": (SHARED_REDIS, 6379), "rabbitmq": (SHARED_RABBITMQ, 5672)}[kind]
    if not _port_open(port):
        message = f"{kind} is not running on 127.0.0.1:{port}"
        if require_services():
            pytest.fail(f"{message} (required in CI)")
        pytest.skip(message)
    return url


def unique_queues() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "PACS_AGENT_BROKER__INFERENCE_QUEUE": f"test-inference-{tag}",
        "PACS_AGENT_BROKER__IO_QUEUE": f"test-io-{tag}",
    }


def delete_queues(url: str | None, env: dict[str, str]) -> None:
    """Remove a test's queues from a shared broker."""
    if url is None:
        return
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        channel = conn.default_channel
        for key in ("PACS_AGENT_BROKER__INFERENCE_QUEUE", "PACS_AGENT_BROKER__IO_QUEUE"):
            try:
                channel.queue_delete(env[key])
            except Exception:
                channel = conn.channel()


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, without persistence: stopping it
    loses every message it held (the worst case for a broker restart)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [exe, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _port_open(self.port), 20, "redis-server to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class RabbitMQServer:
    """A private RabbitMQ node on free loopback ports, with its own data directory.

    Debian's ``rabbitmq-server`` runs as the ``rabbitmq`` user, so the directory is made
    outside the caller's private temporary folder and given to that user."""

    port: int = field(default_factory=free_port)
    workdir: Path | None = None
    name: str = field(default_factory=lambda: f"pacs-agent-test-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        exe = shutil.which("rabbitmq-server")
        if exe is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pacs-agent-rabbitmq-"))
        base = self.workdir
        for d in (base / "mnesia", base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", "rabbitmq", str(base)], check=False)
        base.chmod(0o755)
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"{self.name}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_MNESIA_DIR": str(base / "mnesia" / "node"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "mnesia" / "feature_flags"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "no-config"),
        }
        self.proc = subprocess.Popen(
            [exe],
            env=env,
            stdout=(base / "server.out").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._up(), 60, "rabbitmq-server to listen")

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            assert self.workdir is not None
            out = (self.workdir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"rabbitmq-server exited:\n{out}")
        return _port_open(self.port)

    def _node_pids(self) -> list[int]:
        """Processes of this node: ``su`` starts the VM in a session of its own, so they are
        found by the node name in their environment (only this test's node has it)."""
        marker = f"RABBITMQ_NODENAME={self.name}@localhost".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def kill(self) -> None:
        """SIGKILL the whole node (the broker dies; its durable data stays)."""
        for pid in self._node_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)
        wait_for(lambda: not _port_open(self.port), 20, "rabbitmq-server to go")

    def cleanup(self) -> None:
        self.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class WorkerProcess:
    """``python -m workers`` in its own process group (so kill -9 takes it all)."""

    env: dict[str, str]
    log_path: Path
    queues: str | None = None
    pool: str = "solo"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "workers", "--pool", self.pool]
        if self.queues:
            cmd += ["--queues", self.queues]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def small_study(out: Path, seed: int, slices: int = 12, size: int = 64) -> tuple[str, list[Path]]:
    """A small synthetic CT study on disk: (Study Instance UID, files)."""
    datasets, _ = make_ct_study_with_truth(
        None, rows=size, cols=size, slices=slices, seed=seed, patient_id=f"ORCH-{seed}", n_blobs=2
    )
    files = write_study(datasets, out / f"study-{seed}")
    return str(datasets[0].StudyInstanceUID), files


def send_study(
    files: list[Path], port: int, calling_ae: str = "TESTSCU", host: str = "127.0.0.1"
) -> None:
    """C-STORE files to the agent with dcmtk's storescu (Nagle off), one association."""
    out = subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", "PACSAGENT", host, str(port)]
        + [str(f) for f in files],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def jobs_of(database_url: str) -> list[Job]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))
    finally:
        engine.dispose()


def study_uid_of(database_url: str) -> dict[int, str]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(select(Study.id, Study.study_instance_uid)).all()
            return {study_id: uid for study_id, uid in rows}
    finally:
        engine.dispose()


def results_in_orthanc(orthanc: Orthanc) -> Counter[tuple[str, str]]:
    """How many instances Orthanc holds per (Study Instance UID, modality) of SEG and SR."""
    counts: Counter[tuple[str, str]] = Counter()
    for modality in ("SEG", "SR"):
        series: list[dict[str, Any]] = orthanc.post_json(
            "/tools/find", {"Level": "Series", "Query": {"Modality": modality}, "Expand": True}
        )
        for s in series:
            study = orthanc.get(f"/studies/{s['ParentStudy']}")
            counts[(study["MainDicomTags"]["StudyInstanceUID"], modality)] += len(s["Instances"])
    return counts


def wait_all_exported(
    database_url: str, n_jobs: int, timeout: float, logs: list[Path]
) -> list[Job]:
    """Wait until ``n_jobs`` jobs exist and all are exported (fail early on a failed one)."""

    def done() -> list[Job] | None:
        jobs = [j for j in jobs_of(database_url) if j.status != "superseded"]
        bad = [j for j in jobs if j.status in ("failed", "export_failed", "cancelled")]
        if bad:
            tails = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
            pytest.fail(f"jobs ended badly: {[(j.id, j.status, j.reason) for j in bad]}\n{tails}")
        if len(jobs) >= n_jobs and all(j.status == "exported" for j in jobs):
            return jobs
        return None

    try:
        result: list[Job] = wait_for(done, timeout, f"{n_jobs} exported jobs", interval=0.3)
    except TimeoutError:
        states = [(j.id, j.status, j.reason) for j in jobs_of(database_url)]
        tails = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
        pytest.fail(f"not all exported in {timeout:.0f} s: {states}\n{tails}")
    return result


def settle(seconds: float) -> None:
    time.sleep(seconds)
