"""A restart of ``pacs-agent serve`` (a real subprocess) loses no pending study and does not
re-run complete ones: the assembler's state is in the database."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs_agent.db.models import Instance, Job, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from tests.helpers.servers import Agent, free_port, wait_for

pytestmark = pytest.mark.integration


def _storescu(port: int, files: list[Path]) -> None:
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (apt-get install dcmtk)"
    result = subprocess.run(
        [exe, "-aec", "PACSAGENT", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_restart_with_a_pending_study_loses_nothing_and_reruns_nothing(tmp_path: Path) -> None:
    port = free_port()
    done = write_study(make_ct_study(None, slices=8, rows=48, cols=48, seed=31), tmp_path / "a")
    pending = write_study(make_ct_study(None, slices=8, rows=48, cols=48, seed=32), tmp_path / "b")

    def agent(idle_s: int) -> Agent:
        return Agent(
            workdir=tmp_path / "agent",
            port=port,
            with_worker=False,
            env_overrides={"PACS_AGENT_ASSEMBLER__IDLE_TIMEOUT_S": str(idle_s)},
        )

    db = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'agent/var/pacs-agent.db'}"))

    def study_status(n: int) -> str | None:
        with db() as s:
            rows = s.scalars(select(Study).order_by(Study.id)).all()
            return rows[n].status if len(rows) > n else None

    # Run 1: study A arrives and completes; its jobs are created.
    first = agent(idle_s=1)
    first.start()
    try:
        _storescu(port, done)
        wait_for(lambda: study_status(0) == "complete", 30, "study A to complete")
    finally:
        first.stop()
    with db() as s:
        jobs_a = sorted(s.scalars(select(Job.id)))
        completed_a = s.scalars(select(Study.completed_at)).one()
    assert jobs_a, "study A created no job"

    # Run 2: study B arrives, then the agent stops before B can complete (long idle time).
    second = agent(idle_s=600)
    second.start()
    try:
        _storescu(port, pending)
    finally:
        second.stop()
    assert study_status(1) == "receiving"

    # Run 3: the restarted agent completes B from the database alone and leaves A alone.
    third = agent(idle_s=1)
    third.start()
    try:
        wait_for(lambda: study_status(1) == "complete", 30, "pending study B to complete")
    finally:
        third.stop()
    with db() as s:
        study_a, study_b = s.scalars(select(Study).order_by(Study.id)).all()
        assert study_a.completed_at == completed_a  # not re-completed
        assert sorted(s.scalars(select(Job.id).where(Job.study_id == study_a.id))) == jobs_a
        count_b = s.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_b.id)
        )
        jobs_b = s.scalars(select(Job).where(Job.study_id == study_b.id)).all()
    assert count_b == 8
    assert len(jobs_b) == len(jobs_a)  # one job per rule and series, created once
    assert all(j.status != "superseded" for j in jobs_b)
