"""Job orchestration with real brokers, real workers and a real PACS (Orthanc).

Studies go in over DICOM (dcmtk storescu); results come back to Orthanc as SEG and SR. Each
test runs on the embedded broker, the machine's Redis and its RabbitMQ (queues unique to the
test); the fault tests kill workers with SIGKILL and stop a private Redis.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.orchestration import (
    RabbitMQServer,
    RedisServer,
    WorkerProcess,
    delete_queues,
    jobs_of,
    results_in_orthanc,
    send_study,
    shared_broker_url,
    small_study,
    study_uid_of,
    unique_queues,
    wait_all_exported,
)
from tests.helpers.servers import REPO, Agent, Orthanc, free_port, wait_for

pytestmark = pytest.mark.integration

BROKERS = ["embedded", "redis", "rabbitmq"]
#: Every broker on SQLite and on PostgreSQL.
MATRIX = [(b, "sqlite") for b in BROKERS] + [(b, "postgresql") for b in BROKERS]


def database_for(db: str, request: pytest.FixtureRequest) -> str | None:
    """None for the agent's own SQLite file, or a fresh PostgreSQL database."""
    if db == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@dataclass
class Site:
    orthanc: Orthanc
    agent: Agent
    workdir: Path
    database_url: str
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return self.agent.env()

    @property
    def logs(self) -> list[Path]:
        return [self.agent.log_path, *(w.log_path for w in self.workers)]

    def worker(self, name: str, pool: str = "solo") -> WorkerProcess:
        w = WorkerProcess(env=self.env, log_path=self.workdir / f"{name}.log", pool=pool)
        self.workers.append(w)
        w.start()
        return w

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_agent", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def send(self, seed: int, calling_ae: str = "TESTSCU", size: int = 64, slices: int = 12) -> str:
        study_uid, files = small_study(self.workdir / "studies", seed, slices=slices, size=size)
        send_study(files, self.agent.port, calling_ae)
        return study_uid

    def one_seg_and_sr_per_study(self, study_uids: list[str]) -> None:
        def counts_ok() -> bool:
            counts = results_in_orthanc(self.orthanc)
            return all(counts[(u, "SEG")] >= 1 and counts[(u, "SR")] >= 1 for u in study_uids)

        wait_for(counts_ok, 30, "a SEG and an SR per study in Orthanc")
        counts = results_in_orthanc(self.orthanc)
        for uid in study_uids:
            assert counts[(uid, "SEG")] == 1, f"{uid}: {counts}"
            assert counts[(uid, "SR")] == 1, f"{uid}: {counts}"


@contextmanager
def make_site(
    tmp_path: Path,
    broker_url: str | None,
    *,
    database_url: str | None = None,
    with_worker: bool = True,
    env: dict[str, str] | None = None,
    config_toml: str = "",
    orthanc_port: int | None = None,
) -> Iterator[Site]:
    agent_port = free_port()
    orthanc = Orthanc(
        workdir=tmp_path / "orthanc",
        dicom_port=orthanc_port or free_port(),
        http_port=free_port(),
        modalities={"agent": ["PACSAGENT", "127.0.0.1", agent_port]},
    )
    queues = unique_queues()
    overrides = {
        **queues,
        "PACS_AGENT_EXPORT__DESTINATIONS": json.dumps(
            [
                {
                    "name": "orthanc",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ]
        ),
        "PACS_AGENT_EXPORT__BACKOFF_INITIAL_S": "0.5",
        "PACS_AGENT_WORKER__LEASE_S": "3",
        "PACS_AGENT_WORKER__REQUEUE_AFTER_S": "8",
        "PACS_AGENT_WORKER__RETRY_BACKOFF_S": "1",
        "PACS_AGENT_ASSEMBLER__IDLE_TIMEOUT_S": "0.5",
        "PACS_AGENT_ASSEMBLER__POLL_INTERVAL_S": "0.1",
        **(env or {}),
    }
    if broker_url is not None:
        overrides["PACS_AGENT_BROKER__URL"] = broker_url
    if database_url is not None:
        overrides["PACS_AGENT_DATABASE__URL"] = database_url
    agent = Agent(
        workdir=tmp_path / "agent",
        port=agent_port,
        env_overrides=overrides,
        with_worker=with_worker,
        config_toml=config_toml,
    )
    site = Site(
        orthanc,
        agent,
        tmp_path,
        database_url or f"sqlite:///{agent.data_dir}/pacs-agent.db",
    )
    orthanc.start()
    try:
        agent.start()
        yield site
    finally:
        for w in site.workers:
            w.stop()
        agent.stop()
        orthanc.stop()
        with contextlib.suppress(Exception):
            delete_queues(broker_url, queues)


@pytest.mark.parametrize(("broker", "db"), MATRIX)
def test_every_study_is_processed_once_and_reprocessing_replaces_its_results(
    broker: str, db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = shared_broker_url(broker)
    with make_site(tmp_path, url, database_url=database_for(db, request)) as site:
        uids = [site.send(seed) for seed in (1, 2, 3)]
        jobs = wait_all_exported(site.database_url, 3, 240, site.logs)
        assert sorted(study_uid_of(site.database_url)[j.study_id] for j in jobs) == sorted(uids)
        assert all(j.attempts == 1 for j in jobs)
        assert all(j.load_s is not None and j.inference_s is not None for j in jobs)
        site.one_seg_and_sr_per_study(uids)

        # An administrator reprocesses one study: a new job, the old one superseded, and the
        # PACS still holds one SEG and one SR (deterministic UIDs replace, never duplicate).
        out = site.cli("reprocess", "--study", uids[0], "--force", "--actor", "test-admin")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "created job" in out.stdout
        wait_all_exported(site.database_url, 3, 120, site.logs)
        states = [
            (j.status, study_uid_of(site.database_url)[j.study_id])
            for j in jobs_of(site.database_url)
        ]
        assert states.count(("superseded", uids[0])) == 1
        assert states.count(("exported", uids[0])) == 1
        site.one_seg_and_sr_per_study(uids)


@pytest.mark.parametrize(
    ("broker", "db"), [(b, "sqlite") for b in BROKERS] + [("redis", "postgresql")]
)
def test_killing_the_inference_worker_mid_job_loses_nothing_and_duplicates_nothing(
    broker: str, db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = shared_broker_url(broker)
    env = {"PACS_AGENT_WORKER__MAX_ATTEMPTS": "10"}
    database = database_for(db, request)
    with make_site(tmp_path, url, database_url=database, with_worker=False, env=env) as site:
        rng = random.Random(6)
        site.worker("worker-0")
        uids = [site.send(seed) for seed in (11, 12, 13)]
        kills = 0
        deadline = time.monotonic() + 180
        while kills < 3 and time.monotonic() < deadline:
            running = [j for j in jobs_of(site.database_url) if j.status == "running"]
            if not running:
                time.sleep(0.05)
                continue
            time.sleep(rng.uniform(0.0, 0.4))
            site.workers[-1].kill9()
            kills += 1
            site.worker(f"worker-{kills}")
        assert kills == 3, "no job was ever seen running"
        jobs = wait_all_exported(site.database_url, 3, 240, site.logs)
        assert sum(j.attempts for j in jobs) >= 3 + 1, "a killed run was not tried again"
        site.one_seg_and_sr_per_study(uids)
        # Each job left exactly one set of result files behind, whatever the kills.
        assert all(j.seg_sop_instance_uid and j.sr_sop_instance_uid for j in jobs)


def test_a_redis_restart_while_studies_arrive_loses_nothing(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with make_site(tmp_path, redis.url) as site:
            first = site.send(21)
            wait_all_exported(site.database_url, 1, 180, site.logs)
            redis.stop()  # every message the broker held is gone with it
            during = [site.send(seed) for seed in (22, 23)]
            wait_for(
                lambda: len(jobs_of(site.database_url)) == 3, 30, "jobs of the studies received"
            )
            time.sleep(2)
            assert {j.status for j in jobs_of(site.database_url)[1:]} <= {"pending", "queued"}
            redis = RedisServer(tmp_path / "redis", port=redis.port)
            redis.start()
            wait_all_exported(site.database_url, 3, 240, site.logs)
            site.one_seg_and_sr_per_study([first, *during])
    finally:
        redis.stop()


def test_a_rabbitmq_restart_while_studies_arrive_loses_nothing(tmp_path: Path) -> None:
    rabbit = RabbitMQServer()
    rabbit.start()
    try:
        with make_site(tmp_path, rabbit.url) as site:
            first = site.send(26)
            wait_all_exported(site.database_url, 1, 180, site.logs)
            rabbit.kill()
            during = [site.send(seed) for seed in (27, 28)]
            wait_for(
                lambda: len(jobs_of(site.database_url)) == 3, 30, "jobs of the studies received"
            )
            time.sleep(2)
            assert {j.status for j in jobs_of(site.database_url)[1:]} <= {"pending", "queued"}
            rabbit.start()
            wait_all_exported(site.database_url, 3, 240, site.logs)
            site.one_seg_and_sr_per_study([first, *during])
    finally:
        rabbit.cleanup()
