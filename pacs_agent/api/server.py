"""Running the API: alone (``pacs-agent api``) or as a thread of ``serve``."""

from __future__ import annotations

import logging
import threading

import uvicorn
from prometheus_client import CollectorRegistry

from pacs_agent.api.app import create_app
from pacs_agent.api.auth import exposure_problem
from pacs_agent.config import Settings

log = logging.getLogger(__name__)


class ApiRefused(Exception):
    """The API settings would expose it to anyone on the network."""


def make_server(
    settings: Settings, listener_registry: CollectorRegistry | None = None
) -> uvicorn.Server:
    """A uvicorn server for the app; raises ApiRefused for a non-loopback bind without tokens."""
    problem = exposure_problem(settings.api)
    if problem is not None:
        raise ApiRefused(problem)
    app = create_app(settings, listener_registry=listener_registry)
    config = uvicorn.Config(
        app,
        host=settings.api.host,
        port=settings.api.port,
        access_log=False,  # ours logs the path without the query string (accession numbers)
        log_config=None,  # the process's logging setup
        server_header=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)


class ApiThread:
    """The API inside ``serve``: a uvicorn server on its own thread."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, name="api", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            deadline.wait(0.05)
        if not self.server.started:
            raise OSError(
                f"the API did not start on {self.server.config.host}:{self.server.config.port}"
            )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run(settings: Settings) -> int:
    """``pacs-agent api``: serve until SIGTERM or SIGINT; the exit code."""
    try:
        server = make_server(settings)
    except ApiRefused as exc:
        log.error("refusing to start: %s", exc)
        return 2
    print(f"pacs-agent API on http://{settings.api.host}:{settings.api.port}", flush=True)
    server.run()
    return 0 if server.started else 2
