"""A real ``pacs-agent serve`` with its HTTP API on a free loopback port, tokens configured,
and one synthetic CT study sent over DICOM and processed by the demo CT model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pacs_agent.api.auth import hash_token
from tests.helpers.orchestration import jobs_of, send_study, small_study
from tests.helpers.servers import Agent, free_port, wait_for

READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
#: Jobs in these states hold results (no export destination is configured).
DONE = ("succeeded", "exported")


@dataclass
class ApiSite:
    agent: Agent
    api_port: int
    study_uid: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.agent.data_dir / 'pacs-agent.db'}"

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def get(self, path: str, token: str | None = READ_TOKEN, **params: Any) -> httpx.Response:
        with self.client(token) as c:
            return c.get(path, params=params)


@contextlib.contextmanager
def api_site(
    tmp_path: Path, seed: int = 71, env: dict[str, str] | None = None
) -> Iterator[ApiSite]:
    """Start the agent (listener, scheduler, worker, API), send one study, wait until its
    job has results; stop everything afterwards."""
    api_port = free_port()
    agent = Agent(
        workdir=tmp_path / "agent",
        port=free_port(),
        env_overrides={
            "PACS_AGENT_API__PORT": str(api_port),
            "PACS_AGENT_API__READ_TOKENS": f'["{READ_TOKEN}"]',
            # The admin token is configured by its hash only.
            "PACS_AGENT_API__ADMIN_TOKENS": f'["{hash_token(ADMIN_TOKEN)}"]',
            **(env or {}),
        },
    )
    agent.start()
    try:
        study_uid, files = small_study(tmp_path / "data", seed)
        send_study(files, agent.port)
        site = ApiSite(agent, api_port, study_uid)

        def done() -> bool:
            jobs = jobs_of(site.database_url)
            bad = [(j.id, j.status, j.reason) for j in jobs if j.status in ("failed", "cancelled")]
            if bad:
                raise AssertionError(f"job ended badly: {bad}\n{agent.log_tail()}")
            return any(j.status in DONE for j in jobs)

        wait_for(
            done,
            240,
            "the demo CT job to finish",
            interval=0.5,
        )
        yield site
    finally:
        agent.stop()
