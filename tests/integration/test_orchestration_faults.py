"""Races, priorities and time limits, with real databases, brokers and worker processes."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.config import Settings
from pacs_agent.db.jobs import transition
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Job, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.queue import CeleryDispatcher, TaskLimits, make_celery
from tests.helpers.orchestration import (
    jobs_of,
    shared_broker_url,
    wait_all_exported,
)
from tests.helpers.servers import REPO, wait_for
from tests.integration.test_orchestration import make_site

pytestmark = pytest.mark.integration

DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'race.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_of_many_racing_claims_on_a_job_exactly_one_wins(database_url: str) -> None:
    upgrade(database_url)
    sf = make_session_factory(make_engine(database_url))
    now = datetime.now(UTC)
    with sf.begin() as session:
        study = Study(study_instance_uid="1.2.826.0.1.1", status="complete")
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.826.0.1.1.1")
        session.add(series)
        session.flush()
        ids = []
        for _ in range(10):
            job = Job(
                study_id=study.id,
                series_id=series.id,
                model_name="m",
                status="queued",
                created_at=now,
                updated_at=now,
            )
            session.add(job)
            session.flush()
            ids.append(job.id)

    racers = 6
    factories = [make_session_factory(make_engine(database_url)) for _ in range(racers)]
    for job_id in ids:
        barrier = threading.Barrier(racers)
        wins: list[int] = []

        def claim(
            n: int,
            job_id: int = job_id,
            barrier: threading.Barrier = barrier,
            wins: list[int] = wins,
        ) -> None:
            barrier.wait()
            with factories[n].begin() as session:
                if transition(
                    session,
                    job_id,
                    JobStatus.RUNNING,
                    only_from=[JobStatus.QUEUED],
                    worker=f"racer-{n}",
                    attempts=Job.attempts + 1,
                ):
                    wins.append(n)

        threads = [threading.Thread(target=claim, args=(n,)) for n in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(wins) == 1, f"job {job_id}: {wins}"
        with sf() as session:
            job = session.get(Job, job_id)
            assert job is not None
            assert (job.status, job.attempts, job.worker) == ("running", 1, f"racer-{wins[0]}")


@pytest.mark.parametrize("db", DATABASES)
def test_two_workers_given_the_same_job_run_it_once(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = shared_broker_url("redis")
    assert url is not None
    database = None if db == "sqlite" else request.getfixturevalue("postgres_url")
    with make_site(tmp_path, url, database_url=database, with_worker=False) as site:
        w1, w2 = site.worker("worker-a"), site.worker("worker-b")
        # Both workers are up (torch imported) before the job exists.
        wait_for(
            lambda: all("ready" in w.log_path.read_text(errors="replace") for w in (w1, w2)),
            90,
            "both workers ready",
        )
        study_uid = site.send(41)
        job = wait_for(
            lambda: next((j for j in jobs_of(site.database_url) if j.status == "queued"), None),
            60,
            "a queued job",
            interval=0.02,
        )
        env = site.env
        settings = Settings(
            broker={  # type: ignore[arg-type]
                "url": url,
                "inference_queue": env["PACS_AGENT_BROKER__INFERENCE_QUEUE"],
                "io_queue": env["PACS_AGENT_BROKER__IO_QUEUE"],
            }
        )
        # A second delivery of the same job, as a redelivery or a sweeper would send.
        CeleryDispatcher(make_celery(settings)).send_inference(job.id, 0, TaskLimits(600, 660))
        (done,) = wait_all_exported(site.database_url, 1, 180, site.logs)
        time.sleep(1.0)  # let the second delivery be consumed too
        assert done.attempts == 1
        logs = "".join(w.log_path.read_text(errors="replace") for w in (w1, w2))
        assert logs.count(f"job {job.id}: not queued any more; skipping this delivery") == 1
        assert logs.count(f"job {job.id}: demo_ct_blob_seg on series") == 1
        site.one_seg_and_sr_per_study([study_uid])


URGENT_RULES = """
[[models.rules]]
name = "routine"
modality = ["CT"]
models = ["demo_ct_blob_seg"]

[[models.rules]]
name = "urgent"
modality = ["CT"]
calling_ae_title = ["ER_CT"]
models = ["demo_ct_blob_seg"]
priority = 9
"""


def test_an_urgent_study_overtakes_a_routine_backlog(tmp_path: Path) -> None:
    env = {"PACS_AGENT_BROKER__MAX_QUEUED": "1"}
    with make_site(tmp_path, None, with_worker=False, env=env, config_toml=URGENT_RULES) as site:
        for seed in (51, 52, 53, 54):
            site.send(seed)
        site.send(55, calling_ae="ER_CT")
        wait_for(lambda: len(jobs_of(site.database_url)) == 5, 60, "five jobs")
        site.worker("worker")
        jobs = wait_all_exported(site.database_url, 5, 240, site.logs)
        (urgent,) = [j for j in jobs if j.rule == "urgent"]
        routine = sorted((j for j in jobs if j.rule == "routine"), key=lambda j: j.started_at)
        assert urgent.priority == 9
        assert urgent.started_at is not None
        # One routine job was already in the broker; the urgent one runs right after it.
        overtaken = [j for j in routine if j.started_at and j.started_at > urgent.started_at]
        assert len(overtaken) == 3, [(j.id, j.rule, j.started_at) for j in jobs]


def _models_with_a_second_demo(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    demo = REPO / "workers" / "bundles" / "demo_ct_blob_seg"
    shutil.copytree(demo, models / "demo_ct_blob_seg")
    shutil.copytree(demo, models / "demo_hung")
    card = models / "demo_hung" / "pacs-agent.toml"
    card.write_text(card.read_text().replace('name = "demo_ct_blob_seg"', 'name = "demo_hung"'))
    return models


def _time_limited_site(tmp_path: Path, soft: tuple[float, float], hard: tuple[float, float]) -> str:
    models = _models_with_a_second_demo(tmp_path)
    return f"""
[models]
directory = "{models}"

[[models.rules]]
name = "soft"
modality = ["CT"]
calling_ae_title = ["SOFT"]
models = ["demo_ct_blob_seg"]

[[models.rules]]
name = "hard"
modality = ["CT"]
calling_ae_title = ["HARD"]
models = ["demo_hung"]

[models.time_limits.demo_ct_blob_seg]
soft_s = {soft[0]}
hard_s = {soft[1]}

[models.time_limits.demo_hung]
soft_s = {hard[0]}
hard_s = {hard[1]}
"""


def _wait_failed(site: Any, n: int) -> list[Job]:
    def ended() -> list[Job] | None:
        jobs = jobs_of(site.database_url)
        return jobs if len(jobs) == n and all(j.status == "failed" for j in jobs) else None

    try:
        jobs: list[Job] = wait_for(ended, 120, "the jobs to fail", interval=0.3)
    except TimeoutError:
        states = [(j.model_name, j.status, j.reason) for j in jobs_of(site.database_url)]
        pytest.fail(f"{states}\n{site.agent.log_tail()}")
    return jobs


def test_past_its_soft_time_limit_a_job_fails_at_once_with_that_reason(tmp_path: Path) -> None:
    config = _time_limited_site(tmp_path, soft=(0.01, 60), hard=(50, 60))
    with make_site(tmp_path, None, config_toml=config) as site:
        # Celery's pool checks time limits about once a second: a run of a few seconds
        # (a larger study) is sure to be caught.
        site.send(61, calling_ae="SOFT", size=256, slices=48)
        (soft,) = _wait_failed(site, 1)
        assert soft.reason is not None and "time limit: the model run took longer" in soft.reason
        assert soft.attempts == 1, "a time limit is permanent: no retry"
        assert soft.seg_path is None


def test_past_its_hard_time_limit_a_job_is_tried_again_until_attempts_run_out(
    tmp_path: Path,
) -> None:
    config = _time_limited_site(tmp_path, soft=(50, 60), hard=(50, 0.05))
    env = {"PACS_AGENT_WORKER__MAX_ATTEMPTS": "2"}
    with make_site(tmp_path, None, env=env, config_toml=config) as site:
        site.send(62, calling_ae="HARD", size=256, slices=48)
        (hard,) = _wait_failed(site, 1)
        assert hard.attempts == 2
        assert hard.reason is not None and "worker was lost 2 time(s)" in hard.reason


def _produce_messages(data_dir: str, n: int) -> None:
    app = make_celery(Settings(data_dir=Path(data_dir)))
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("half-written")
        for i in range(n):
            queue.put({"i": i, "pad": "x" * 400_000})


def test_the_embedded_broker_never_hands_out_a_half_written_message(tmp_path: Path) -> None:
    """kombu's own filesystem transport writes messages in place: a consumer polling at the
    same moment takes an empty file and the message is lost (3 of 400 large messages in one
    run here). The embedded broker renames whole messages into the queue folder."""
    app = make_celery(Settings(data_dir=tmp_path))
    n = 400
    received: set[int] = set()
    errors: list[str] = []
    # The producer is another process, as `serve` is beside its workers (two connections in
    # one process share kombu's in-memory broker state).
    producer = multiprocessing.get_context("spawn").Process(
        target=_produce_messages, args=(str(tmp_path), n)
    )
    producer.start()
    with app.connection_for_read() as conn:
        assert type(conn.transport).__name__ == "AtomicFilesystemTransport"
        queue = conn.SimpleQueue("half-written")
        deadline = time.monotonic() + 120
        while len(received) < n and time.monotonic() < deadline:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                if not producer.is_alive() and len(received) < n:
                    break
                continue
            except Exception as exc:
                errors.append(repr(exc))
                continue
            received.add(message.payload["i"])
            message.ack()
    producer.join(60)
    assert errors == []
    assert received == set(range(n))
