"""Database growth per received instance and per study, on PostgreSQL (docs/deployment.md).

Starts ``pacs-agent serve`` (listener, scheduler, embedded worker) on a fresh PostgreSQL
database, sends N synthetic CT studies of S slices with dcmtk storescu, waits until every job
has succeeded (results kept on disk: no export destination), runs VACUUM, and reports
``pg_database_size`` beyond the empty migrated schema, per instance and per study. The pixel
size does not change the rows, so the studies are small (64x64).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from pacs_agent.db.migrate import upgrade  # noqa: E402
from pacs_agent.db.models import Finding, Instance, Job, Series, Study  # noqa: E402
from pacs_agent.db.session import make_engine, make_session_factory  # noqa: E402
from tests.helpers.orchestration import send_study, small_study  # noqa: E402
from tests.helpers.servers import Agent, free_port, postgres_database, wait_for  # noqa: E402


def db_size(url: str) -> int:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("VACUUM"))
            size = conn.execute(text("SELECT pg_database_size(current_database())"))
            return int(size.scalar_one())
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as s:
            return {
                m.__tablename__: int(s.scalar(select(func.count()).select_from(m)) or 0)
                for m in (Study, Series, Instance, Job, Finding)
            }
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()
    with postgres_database("pacs_agent_bench") as url, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upgrade(url)
        empty = db_size(url)
        agent = Agent(
            workdir=work / "agent",
            port=free_port(),
            env_overrides={"PACS_AGENT_DATABASE__URL": url},
        )
        agent.start()
        t0 = time.monotonic()
        try:
            for seed in range(args.studies):
                _, files = small_study(work / "studies", 900 + seed, slices=args.slices)
                send_study(files, agent.port)
                for f in files:
                    f.unlink()

            def done() -> bool:
                engine = make_engine(url)
                try:
                    with make_session_factory(engine)() as s:
                        jobs = list(s.scalars(select(Job)))
                finally:
                    engine.dispose()
                return len(jobs) == args.studies and all(j.status == "succeeded" for j in jobs)

            wait_for(done, 600, "every job to succeed", interval=1.0)
        finally:
            agent.stop()
        grown = db_size(url) - empty
        rows = counts(url)
    n_inst = rows["instances"]
    print(f"studies {args.studies} x {args.slices} slices, {time.monotonic() - t0:.0f} s")
    print(f"rows: {rows}")
    print(f"empty schema {empty / 2**20:.1f} MiB; grown by {grown / 2**20:.1f} MiB after VACUUM")
    per_study = grown / args.studies / 1024
    print(f"per instance {grown / n_inst:.0f} bytes; per study {per_study:.0f} KiB")
    per_day = grown / n_inst * 500 * 1000
    print(f"1,000 studies of 500 instances: {per_day / 2**30:.2f} GiB a day")
    return 0


if __name__ == "__main__":
    sys.exit(main())
