"""Several hosts without containers: what docs/deployment.md describes, on loopback.

"Host A" (127.0.0.2) runs the listener with the scheduler and an io worker; "hosts B and C"
run one inference worker each, as separate processes with data directories of their own.
The hosts share only PostgreSQL, the broker (Redis) and the storage paths (spool and
results, which would be an NFS mount). Orthanc is the PACS that receives the results.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from pacs_agent.db.models import Job
from tests.helpers.orchestration import (
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
from tests.helpers.servers import Agent, Orthanc, free_port, wait_for

pytestmark = pytest.mark.integration

HOST_A = "127.0.0.2"
STUDIES = 20


def _ready(worker: WorkerProcess) -> bool:
    if worker.proc is not None and worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited:\n{worker.log_path.read_text(errors='replace')}")
    return "ready" in worker.log_path.read_text(errors="replace")


def test_twenty_studies_over_three_hosts_are_each_processed_once_when_a_worker_is_killed(
    tmp_path: Path, postgres_url: str
) -> None:
    broker = shared_broker_url("redis")
    assert broker is not None
    shared = tmp_path / "shared-storage"
    agent_port = free_port()
    orthanc = Orthanc(
        workdir=tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        modalities={"agent": ["PACSAGENT", HOST_A, agent_port]},
    )
    queues = unique_queues()
    common = {
        **queues,
        "PACS_AGENT_DATABASE__URL": postgres_url,
        "PACS_AGENT_BROKER__URL": broker,
        "PACS_AGENT_STORAGE__SPOOL_DIR": str(shared / "spool"),
        "PACS_AGENT_STORAGE__RESULTS_DIR": str(shared / "results"),
        "PACS_AGENT_EXPORT__DESTINATIONS": json.dumps(
            [
                {
                    "name": "pacs",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ]
        ),
        "PACS_AGENT_EXPORT__BACKOFF_INITIAL_S": "0.5",
        "PACS_AGENT_WORKER__LEASE_S": "6",  # renewed every 2 s: a busy CI host is slow
        "PACS_AGENT_WORKER__REQUEUE_AFTER_S": "8",
        "PACS_AGENT_ASSEMBLER__IDLE_TIMEOUT_S": "0.5",
        "PACS_AGENT_ASSEMBLER__POLL_INTERVAL_S": "0.1",
    }
    agent = Agent(
        workdir=tmp_path / "host-a",
        port=agent_port,
        host=HOST_A,
        env_overrides=common,
        with_worker=False,
    )
    host_a_env = agent.env()

    def worker(host: str, queue: str) -> WorkerProcess:
        env = {**host_a_env, "PACS_AGENT_DATA_DIR": str(tmp_path / host / "var")}
        return WorkerProcess(env=env, log_path=tmp_path / f"{host}.log", queues=queue)

    io_worker = WorkerProcess(
        env=host_a_env,
        log_path=tmp_path / "host-a-io.log",
        queues=queues["PACS_AGENT_BROKER__IO_QUEUE"],
    )
    inference = [worker(h, queues["PACS_AGENT_BROKER__INFERENCE_QUEUE"]) for h in ("b", "c")]
    workers = [io_worker, *inference]
    logs = [agent.log_path, *(w.log_path for w in workers)]
    orthanc.start()
    try:
        agent.start()
        for w in workers:
            w.start()
        wait_for(lambda: all(_ready(w) for w in workers), 120, "three workers ready")

        uids = []
        for seed in range(STUDIES):
            # The first studies are larger, so that a job runs long enough (seconds) to be
            # caught running and killed.
            size, slices = (192, 32) if seed < 4 else (64, 12)
            uid, files = small_study(tmp_path / "studies", 300 + seed, slices=slices, size=size)
            send_study(files, agent_port, host=HOST_A)
            uids.append(uid)

        victim, survivor = inference
        assert victim.proc is not None
        victim_name = f":{victim.proc.pid}"

        def running_on_victim() -> Job | None:
            return next(
                (
                    j
                    for j in jobs_of(postgres_url)
                    if j.status == "running" and (j.worker or "").endswith(victim_name)
                ),
                None,
            )

        caught: Job = wait_for(running_on_victim, 90, "a job running on host b", interval=0.02)
        victim.kill9()
        (at_kill,) = [j for j in jobs_of(postgres_url) if j.id == caught.id]
        assert at_kill.status == "running", "the job ended before the kill: not mid-job"

        jobs = wait_all_exported(postgres_url, STUDIES, 150, logs)
        assert len(jobs) == STUDIES
        by_study = study_uid_of(postgres_url)
        assert sorted(by_study[j.study_id] for j in jobs) == sorted(uids)
        (killed,) = [j for j in jobs if j.id == caught.id]
        assert killed.attempts == 2, "the killed job ran again, once"
        assert killed.worker is not None and survivor.proc is not None
        assert killed.worker.endswith(f":{survivor.proc.pid}")
        others = [(j.id, j.attempts, j.worker) for j in jobs if j.id != caught.id]
        assert all(a == 1 for _, a, _ in others), (caught.id, others)

        def all_in_pacs() -> bool:
            counts = results_in_orthanc(orthanc)
            return all(counts[(u, "SEG")] >= 1 and counts[(u, "SR")] >= 1 for u in uids)

        wait_for(all_in_pacs, 60, "a SEG and an SR per study in Orthanc")
        counts = results_in_orthanc(orthanc)
        assert {k: v for k, v in counts.items() if v != 1} == {}, "a result twice in the PACS"
        assert len(counts) == 2 * STUDIES

        # Storage went where the settings put it: the shared paths, not the hosts' own.
        assert any((shared / "spool").rglob("*.dcm")) or any((shared / "spool").iterdir())
        assert any((shared / "results").iterdir())
        for host in ("host-a", "b", "c"):
            var = tmp_path / host / "var"
            assert not (var / "spool").exists() or not any((var / "spool").rglob("*.*"))
            assert not (var / "results").exists() or not any((var / "results").iterdir())
    finally:
        for w in workers:
            w.stop()
        agent.stop()
        orthanc.stop()
        with contextlib.suppress(Exception):
            delete_queues(broker, queues)
