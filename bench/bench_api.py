"""Benchmark: the API's list endpoints and the dashboard over a large PostgreSQL database.

    .venv/bin/python bench/bench_api.py [--studies 20000] [--jobs-per-study 5] [--requests 30]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Creates a private database, migrates it to head, bulk-inserts ``--studies`` studies (one CT
series of 10 instances each), ``--jobs-per-study`` jobs per study (100,000 by default) in
every state, one finding per job, an export attempt for every second job and 1,000 audit
entries; then starts the real API (uvicorn, as ``pacs-agent api`` does) on a loopback port and
times ``--requests`` HTTP requests per endpoint (lists, ``/metrics``, the dashboard) after 3
warm-up requests. Prints median and
p95 per endpoint as a Markdown table (docs/benchmarks.md records it). The database is dropped
at the end. Goal: median under 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacs_agent.api.server import ApiThread, make_server  # noqa: E402
from pacs_agent.config import load_settings  # noqa: E402
from pacs_agent.db.migrate import upgrade  # noqa: E402
from pacs_agent.db.models import (  # noqa: E402
    AuditEntry,
    Export,
    Finding,
    Instance,
    Job,
    Series,
    Study,
)
from pacs_agent.domain.jobs import JobStatus  # noqa: E402

TOKEN = "bench-admin-token-0123456789"
STATES = [s.value for s in JobStatus]
MODELS = ["demo_ct_blob_seg", "spleen_ct_segmentation", "wholeBody_ct_segmentation"]


def _chunks(rows: list[dict[str, Any]], n: int = 5000) -> Any:
    for i in range(0, len(rows), n):
        yield rows[i : i + n]


def fill(url: str, n_studies: int, jobs_per_study: int) -> None:
    """Bulk-insert the fixture rows (multi-row INSERTs in chunks)."""
    rng = random.Random(7)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    engine = create_engine(url)
    with engine.begin() as conn:
        studies = [
            {
                "id": i,
                "study_instance_uid": f"2.25.{i}",
                "accession_number": f"ACC{i:08d}",
                "study_date": "20260101",
                "study_description": "CT ABDOMEN",
                "status": "complete",
                "first_received_at": t0 + timedelta(minutes=i),
                "last_received_at": t0 + timedelta(minutes=i),
                "completed_at": t0 + timedelta(minutes=i, seconds=5),
            }
            for i in range(1, n_studies + 1)
        ]
        for c in _chunks(studies):
            conn.execute(insert(Study), c)
        series = [
            {
                "id": i,
                "study_id": i,
                "series_instance_uid": f"2.25.{i}.1",
                "modality": "CT" if i % 10 else "MR",
            }
            for i in range(1, n_studies + 1)
        ]
        for c in _chunks(series):
            conn.execute(insert(Series), c)
        instances = [
            {
                "series_id": i,
                "sop_instance_uid": f"2.25.{i}.1.{k}",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "path": f"{i}/{k}.dcm",
                "size_bytes": 525_000,
                "sha256": "0" * 64,
                "received_at": t0 + timedelta(minutes=i),
            }
            for i in range(1, n_studies + 1)
            for k in range(10)
        ]
        for c in _chunks(instances):
            conn.execute(insert(Instance), c)
        jobs, findings, exports = [], [], []
        job_id = 0
        for i in range(1, n_studies + 1):
            for _ in range(jobs_per_study):
                job_id += 1
                created = t0 + timedelta(minutes=i, seconds=10)
                state = rng.choice(STATES)
                jobs.append(
                    {
                        "id": job_id,
                        "study_id": i,
                        "series_id": i,
                        "model_name": rng.choice(MODELS),
                        "model_version": "1.0",
                        "status": state,
                        "reason": "worker lost" if state == "failed" else None,
                        "created_at": created,
                        "updated_at": created,
                        "inference_s": rng.uniform(0.5, 60),
                    }
                )
                findings.append(
                    {
                        "job_id": job_id,
                        "kind": "segment",
                        "segment_number": 1,
                        "label": "Spleen",
                        "code_value": "78961009",
                        "code_scheme": "SCT",
                        "code_meaning": "Spleen",
                        "detected": rng.random() < 0.5,
                        "voxel_count": 1000,
                        "volume_mm3": 150_000.0,
                        "flag": rng.random() < 0.1,
                    }
                )
                if job_id % 2 == 0:
                    exports.append(
                        {
                            "job_id": job_id,
                            "destination": rng.choice(["pacs", "archive"]),
                            "sop_instance_uid": f"2.25.9{job_id}",
                            "attempt": 1,
                            "status": "sent" if rng.random() < 0.9 else "failed",
                            "attempted_at": created + timedelta(seconds=30),
                        }
                    )
        for table, rows in ((Job, jobs), (Finding, findings), (Export, exports)):
            for c in _chunks(rows):
                conn.execute(insert(table), c)
        audit = [
            {
                "at": t0 + timedelta(minutes=k),
                "actor": "admin@host",
                "action": "retry",
                "arguments": "{}",
                "outcome": "1 retried",
                "job_ids": json.dumps([k + 1]),
            }
            for k in range(1000)
        ]
        conn.execute(insert(AuditEntry), audit)
        for table in ("studies", "series", "instances", "jobs", "findings", "exports"):
            conn.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


def endpoints(n_jobs: int) -> list[str]:
    return [
        "/api/v1/studies",
        "/api/v1/studies?modality=MR",
        "/api/v1/studies?accession_number=ACC00010000",
        "/api/v1/series",
        "/api/v1/jobs",
        "/api/v1/jobs?status=failed",
        "/api/v1/jobs?model=spleen_ct_segmentation",
        f"/api/v1/jobs?offset={n_jobs // 2}",
        "/api/v1/jobs?created_since=2026-01-10T00:00:00",
        f"/api/v1/jobs/{n_jobs // 3}",
        "/api/v1/findings?flag=true",
        "/api/v1/exports?destination=pacs&status=failed",
        "/api/v1/audit",
        "/metrics",
        "/",
        f"/jobs/{n_jobs // 3}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--studies", type=int, default=20_000)
    ap.add_argument("--jobs-per-study", type=int, default=5)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument(
        "--postgres",
        default=os.environ.get(
            "PACS_AGENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = ap.parse_args()
    name = f"pacs_agent_bench_api_{os.getpid()}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        t = time.perf_counter()
        fill(url, args.studies, args.jobs_per_study)
        n_jobs = args.studies * args.jobs_per_study
        print(
            f"filled {args.studies} studies, {n_jobs} jobs in {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / name
        settings = load_settings(
            data_dir=data_dir,
            database={"url": url},
            api={"port": port, "admin_tokens": [TOKEN], "access_log": False},
        )
        api = ApiThread(make_server(settings))
        api.start()
        rows = []
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            ) as client:
                for path in endpoints(n_jobs):
                    times = []
                    for k in range(args.requests + 3):
                        t = time.perf_counter()
                        r = client.get(path)
                        elapsed = (time.perf_counter() - t) * 1000
                        if r.status_code != 200:
                            raise SystemExit(f"{path}: HTTP {r.status_code} {r.text[:300]}")
                        if k >= 3:
                            times.append(elapsed)
                    times.sort()
                    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                    rows.append((path, statistics.median(times), p95))
        finally:
            api.stop()
        print(
            f"\n{args.studies} studies, {n_jobs} jobs, PostgreSQL; {args.requests} requests "
            f"per endpoint; {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}\n"
        )
        print("| endpoint | median ms | p95 ms |\n|---|---|---|")
        for path, median, p95 in rows:
            print(f"| `{path}` | {median:.1f} | {p95:.1f} |")
        worst = max(m for _p, m, _q in rows)
        print(f"\nslowest median: {worst:.1f} ms (goal: < 100 ms)")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
