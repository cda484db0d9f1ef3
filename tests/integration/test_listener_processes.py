"""``listener.processes`` > 1: several listener processes of ``pacs-agent serve`` (a real
subprocess) share one port; real dcmtk storescu and pynetdicom senders over loopback."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from pacs_agent.db.models import Instance
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from tests.helpers.servers import (
    Agent,
    free_port,
    postgres_available,
    postgres_database,
    require_services,
    wait_for,
)

pytestmark = pytest.mark.integration

_ACCEPTED = re.compile(r"\[(\d+)\] pacs_agent\.net\.upperlayer: association accepted: 'STORESCU'")
_READY = re.compile(r"listener process (\d+) of \d+ ready \(pid (\d+)\)")
_STARTED = re.compile(r"listener process (\d+) of \d+ started \(pid (\d+)\)")


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The index's URL: SQLite in the agent's data directory, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agent' / 'var' / 'pacs-agent.db'}"
        return
    if not postgres_available():
        if require_services():
            pytest.fail("PostgreSQL is required in CI and is not reachable")
        pytest.skip("PostgreSQL is not reachable")
    with postgres_database() as url:
        yield url


def _agent(tmp_path: Path, processes: int, url: str) -> Agent:
    return Agent(
        workdir=tmp_path / "agent",
        port=free_port(),
        with_worker=False,
        env_overrides={
            "PACS_AGENT_LISTENER__PROCESSES": str(processes),
            "PACS_AGENT_DATABASE__URL": url,
            # No study completes while the test runs: nothing but the listener writes.
            "PACS_AGENT_ASSEMBLER__IDLE_TIMEOUT_S": "600",
        },
    )


def _ready_pids(agent: Agent, processes: int) -> dict[int, int]:
    """Wait until every listener process is accepting; its pid per process number."""

    def ready() -> dict[int, int] | None:
        found = {int(i): int(p) for i, p in _READY.findall(agent.log_tail(10**7))}
        return found if len(found) >= processes else None

    found: dict[int, int] = wait_for(ready, 90, f"{processes} listener processes")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (apt-get install dcmtk)"
    return subprocess.Popen(
        [exe, "-aec", "PACSAGENT", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("processes", "database"),
    [(2, "sqlite"), (3, "sqlite"), (2, "postgresql")],
    indirect=["database"],
)
def test_studies_over_several_associations_are_indexed_once_by_several_processes(
    tmp_path: Path, processes: int, database: str
) -> None:
    studies = [
        write_study(
            make_ct_study(None, slices=10, rows=64, cols=64, seed=100 + n), tmp_path / f"s{n}"
        )
        for n in range(6)
    ]
    agent = _agent(tmp_path, processes, database)
    agent.start()
    try:
        pids = _ready_pids(agent, processes)
        # Two rounds of six associations at once; each study sent twice (the second copy is
        # the same bytes: answered success, indexed once).
        for _round in range(2):
            senders = [_storescu(agent.port, files) for files in studies]
            for sender in senders:
                out, _ = sender.communicate(timeout=180)
                assert sender.returncode == 0, out
        db = make_session_factory(make_engine(database))
        with db() as s:
            rows = s.execute(select(Instance.sop_instance_uid, Instance.path)).all()
            per_sop = dict(
                s.execute(
                    select(Instance.sop_instance_uid, func.count()).group_by(
                        Instance.sop_instance_uid
                    )
                ).all()
            )
        sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for fs in studies for f in fs}
        assert {sop for sop, _ in rows} == sent
        assert set(per_sop.values()) == {1}
        spool = agent.data_dir / "spool"
        assert all((spool / path).is_file() for _, path in rows)
        served_by = {int(p) for p in _ACCEPTED.findall(agent.log_tail(10**7))}
        assert served_by <= set(pids.values())
        assert len(served_by) > 1, f"every association went to one process: {served_by}"
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log_tail()
    assert not [pid for pid in pids.values() if _alive(pid)], "a listener process outlived serve"
    assert not list((agent.data_dir / "spool" / ".incoming").glob("*")), "left in .incoming"
    # Who committed the rows (each writer logs its counters when it stops): on SQLite the one
    # writer in serve that all listener processes share (decision 0024); on PostgreSQL each
    # process's own, side by side.
    writers = {int(pid): int(rows) for pid, rows in _WRITER.findall(agent.log_tail(10**7))}
    if database.startswith("sqlite"):
        assert writers == {agent.proc.pid: 60}, writers
    else:
        assert set(writers) <= set(pids.values()) and sum(writers.values()) == 60, writers


_WRITER = re.compile(r"\[(\d+)\] pacs_agent\.db\.index: index writer: (\d+) rows in")


def _send(port: int, datasets: list[Dataset], acknowledged: list[str]) -> None:
    """pynetdicom sender (TCP_NODELAY set), eight instances an association: records each SOP
    answered success; goes on with a new association after one is lost."""
    for start in range(0, len(datasets), 8):
        ae = AE(ae_title="KEEPSEND")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
        if not assoc.is_established:
            continue
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        for ds in datasets[start : start + 8]:
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, OSError):
                break  # the association was lost
            if status and status.Status == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
        if assoc.is_established:
            assoc.release()


def test_a_killed_listener_process_loses_no_acknowledged_instance_and_is_restarted(
    tmp_path: Path,
) -> None:
    study = make_ct_study(None, slices=160, rows=64, cols=64, seed=7)
    agent = _agent(tmp_path, 2, f"sqlite:///{tmp_path / 'agent' / 'var' / 'pacs-agent.db'}")
    agent.start()
    try:
        pids = _ready_pids(agent, 2)
        acknowledged: list[str] = []
        senders = [
            threading.Thread(target=_send, args=(agent.port, list(study[n::4]), acknowledged))
            for n in range(4)
        ]
        for sender in senders:
            sender.start()
        wait_for(lambda: len(acknowledged) >= 20, 60, "20 acknowledged instances")
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)
        for sender in senders:
            sender.join(180)
        # The parent restarts the dead process with a new pid.
        restarted = wait_for(
            lambda: [
                int(p)
                for i, p in _STARTED.findall(agent.log_tail(10**7))
                if int(i) == 1 and int(p) != victim
            ],
            60,
            "listener process 1 to be restarted",
        )
        assert f"listener process 1 (pid {victim}) exited with -9" in agent.log_tail(10**7)
        db = make_session_factory(make_engine(f"sqlite:///{agent.data_dir / 'pacs-agent.db'}"))
        with db() as s:
            rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.sha256)).all())
        assert 20 <= len(acknowledged) <= len(study)
        missing = [sop for sop in acknowledged if sop not in rows]
        assert missing == [], f"{len(missing)} acknowledged instances not indexed"
        for sop in acknowledged:
            path = next((agent.data_dir / "spool").rglob(f"{sop}.dcm"))
            assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[sop]
        # The new process serves: a whole study goes in after the restart.
        _ready_pids(agent, 2)
        again = write_study(
            make_ct_study(None, slices=8, rows=48, cols=48, seed=8), tmp_path / "again"
        )
        for _ in range(3):
            resend = _storescu(agent.port, again)
            out, _ = resend.communicate(timeout=120)
            assert resend.returncode == 0, out
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0
    assert not [pid for pid in [*pids.values(), *restarted] if _alive(pid)]


def test_killing_serve_leaves_no_listener_process_behind(tmp_path: Path) -> None:
    agent = _agent(tmp_path, 2, f"sqlite:///{tmp_path / 'agent' / 'var' / 'pacs-agent.db'}")
    agent.start()
    try:
        pids = _ready_pids(agent, 2)
        assert agent.proc is not None
        agent.proc.kill()  # no chance to stop its children
        agent.proc.wait()
        wait_for(lambda: not any(_alive(p) for p in pids.values()), 20, "children to exit")
    finally:
        agent.stop()
