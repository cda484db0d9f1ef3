"""``pacs-agent serve``: listener + scheduler + API (+ an embedded worker subprocess).

This process never imports torch or MONAI (DESIGN invariant 4): inference runs in the worker
subprocess (``python -m workers``), which is restarted if it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from pacs_agent.api.auth import exposure_problem as api_exposure_problem
from pacs_agent.api.metrics import ListenerMetrics
from pacs_agent.api.server import ApiRefused, ApiThread
from pacs_agent.api.server import make_server as make_api_server
from pacs_agent.catalog import load_catalog
from pacs_agent.config import Settings
from pacs_agent.db.index import IndexWriter
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.listeners import ListenerFailed, ListenerProcesses, listening_socket
from pacs_agent.net.scp import (
    ListenerRefused,
    RunningListener,
    exposure_problem,
    receiver_for,
    start_listener,
    tls_context,
)
from pacs_agent.net.ups import UpsService
from pacs_agent.queue import CeleryDispatcher, make_celery
from pacs_agent.scheduler import Scheduler
from pacs_agent.storage.spool import Spool

log = logging.getLogger(__name__)


def worker_command(config_file: Path | None, queues: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "workers"]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    if queues:
        cmd += ["--queues", queues]
    return cmd


class EmbeddedWorker:
    """A worker subprocess for both queues, restarted when it dies."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=os.environ.copy())
        log.info("embedded worker started (pid %d)", self.proc.pid)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log.error("embedded worker exited with %s; restarting", self.proc.returncode)
            self.start()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve(settings: Settings, *, config_file: Path | None, with_worker: bool) -> int:
    """Run until SIGTERM or SIGINT. Returns the process exit code."""
    problem = exposure_problem(settings.listener)
    if problem is None and settings.api.enabled:
        problem = api_exposure_problem(settings.api)
    if problem is not None:
        log.error("refusing to start: %s", problem)
        return 2
    if settings.database.auto_upgrade:
        upgrade(settings.database_url)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    session_factory = make_session_factory(make_engine(settings.database_url))
    catalog = load_catalog(settings.models_dir)
    for problem in catalog.errors:
        log.error("model catalog: %s", problem)
    log.info("model catalog: %s", ", ".join(sorted(catalog.models)) or "(empty)")

    dispatcher = CeleryDispatcher(make_celery(settings))
    scheduler = Scheduler(
        settings, session_factory, dispatcher, catalog=lambda: load_catalog(settings.models_dir)
    )
    worker = EmbeddedWorker(worker_command(config_file)) if with_worker else None

    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    listener_registry = CollectorRegistry(auto_describe=False)
    listener_metrics = ListenerMetrics(listener_registry)
    api: ApiThread | None = None
    server: RunningListener | ListenerProcesses
    try:
        if settings.api.enabled:
            api = ApiThread(make_api_server(settings, listener_registry))
            api.start()
        if settings.listener.processes == 1:
            server = start_listener(
                settings.listener,
                receiver_for(settings, session_factory),
                listener_metrics.on_association,
            )
        else:
            # The association counters live in each listener process and are not exported
            # (docs/api.md); every other metric is read from the database.
            server = _start_processes(settings, config_file)
    except (ListenerRefused, ApiRefused, OSError) as exc:
        log.error("refusing to start: %s", exc)
        if api is not None:
            api.stop()
        return 2
    ups_service: UpsService | None = None
    if settings.ups.enabled:
        ups_service = UpsService(settings, session_factory)
        try:
            ups_service.start(stop)
        except OSError as exc:
            log.error("refusing to start: UPS SCP on port %d: %s", settings.ups.port, exc)
            server.shutdown() if isinstance(server, RunningListener) else server.stop()
            return 2
    if worker is not None:
        worker.start()
    thread = threading.Thread(target=scheduler.run, args=(stop,), name="scheduler", daemon=True)
    thread.start()
    count = settings.listener.processes
    print(
        f"pacs-agent listening as {settings.listener.ae_title} on "
        f"{settings.listener.host}:{settings.listener.port}"
        + (f" ({count} processes)" if count > 1 else "")
        + (f"; API on http://{settings.api.host}:{settings.api.port}" if api else ""),
        flush=True,
    )
    code = 0
    try:
        while not stop.wait(1.0):
            if worker is not None:
                worker.check()
            if isinstance(server, ListenerProcesses):
                server.check()
    except ListenerFailed as exc:
        log.error("stopping: %s", exc)
        code = 1
    finally:
        if isinstance(server, ListenerProcesses):
            server.stop()
        else:
            server.shutdown()
        if api is not None:
            api.stop()
        thread.join(10)
        if ups_service is not None:
            ups_service.shutdown()
        if worker is not None:
            worker.stop()
    return code


def _start_processes(settings: Settings, config_file: Path | None) -> ListenerProcesses:
    """``listener.processes`` children on one socket (decision 0013). The parent checks what
    would make every child refuse to start (TLS files) and clears ``.incoming`` once."""
    tls_context(settings.listener)
    spool = Spool(settings.spool_dir)
    sock = listening_socket(settings.listener)
    left = spool.clear_incoming()
    if left:
        log.warning("removed %d half-received files left by a stopped listener", left)
    writer = None
    if settings.database_url.startswith("sqlite"):  # one write turn: share commits (0012)
        writer = IndexWriter(make_session_factory(make_engine(settings.database_url)))
    processes = ListenerProcesses(settings.listener, spool, config_file, sock, writer)
    processes.start()
    return processes
