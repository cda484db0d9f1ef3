"""``pacs-agent retrieve`` against Orthanc's query/retrieve SCP: the study is found (C-FIND),
moved (C-MOVE) to the running agent's listener and processed as if pushed (a job, results
back in Orthanc). The errors an administrator meets are named: PACS unreachable, study not
found, move destination unknown, failed sub-operations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_agent.db.models import AuditEntry, Study
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.orchestration import jobs_of, small_study, study_uid_of
from tests.helpers.paths import REPO
from tests.helpers.servers import free_port, wait_for
from tests.integration.test_orchestration import Site, make_site

pytestmark = pytest.mark.integration


def retrieve(site: Site, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {
        **site.env,
        "PACS_AGENT_QUERY_RETRIEVE__AE_TITLE": site.orthanc.aet,
        "PACS_AGENT_QUERY_RETRIEVE__HOST": "127.0.0.1",
        "PACS_AGENT_QUERY_RETRIEVE__PORT": str(site.orthanc.dicom_port),
        "PACS_AGENT_QUERY_RETRIEVE__TIMEOUT_S": "20",
        **{f"PACS_AGENT_QUERY_RETRIEVE__{k.upper()}": v for k, v in settings.items()},
    }
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent", "retrieve", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def upload(site: Site, files: list[Path]) -> None:
    for f in files:
        site.orthanc.upload(f)


def test_a_retrieved_study_is_processed_as_if_pushed_and_failures_are_named(
    tmp_path: Path,
) -> None:
    # A 1 MiB instance limit lets the listener refuse one big instance: a partial retrieve.
    env = {"PACS_AGENT_LISTENER__MAX_INSTANCE_MB": "1"}
    with make_site(tmp_path, None, env=env) as site:
        uid, files = small_study(tmp_path / "pacs", seed=41)
        accession = str(pydicom.dcmread(files[0]).AccessionNumber)
        upload(site, files)

        out = retrieve(site, "--accession", accession, "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        (moved,) = json.loads(out.stdout)["studies"]
        assert moved["study_instance_uid"] == uid
        assert moved["status"] == 0 and moved["completed"] == len(files)
        assert moved["failed"] == 0 and moved["state"] == "ok"
        assert moved["expected_instances"] == moved["received_instances"] == len(files)
        assert moved["held_instances"] == len(files)
        # Received, assembled, routed: a job on the retrieved study, exported back.
        wait_for(
            lambda: any(
                study_uid_of(site.database_url)[j.study_id] == uid and j.status == "exported"
                for j in jobs_of(site.database_url)
            ),
            240,
            "the retrieved study's job to be exported",
        )

        # Not on the PACS: exit 3, said so.
        out = retrieve(site, "1.2.826.0.1.3680043.10.9999.404")
        assert out.returncode == 3
        assert "has no study 1.2.826.0.1.3680043.10.9999.404" in out.stderr

        # The PACS does not know the destination AE: exit 4 and the failure status explained.
        out = retrieve(site, uid, move_destination="NOBODY")
        assert out.returncode == 4, out.stdout + out.stderr
        # (Orthanc answers 0xC000 with no comment, where the standard has 0xA801.)
        assert "status 0xC000" in out.stdout
        assert "does not know the move destination NOBODY" in out.stdout

        # An accession number that names two studies on the PACS, one of which the listener
        # refuses (its one instance is over listener.max_instance_mb): the retrieve is partial,
        # each study reported with its own state. (Orthanc 1.10 stops a C-MOVE at the first
        # refused sub-operation, with 0xC000 and no counts: the unit tests pin how counts in
        # our own index make that "partial" within one study.)
        uid2, files2 = small_study(tmp_path / "pacs", seed=42, slices=8)
        big = small_study(tmp_path / "big", seed=43, slices=8, size=1024)[1][0]
        ds = pydicom.dcmread(big)
        accession2 = str(pydicom.dcmread(files2[0]).AccessionNumber)
        ds.AccessionNumber = accession2
        ds.save_as(big)
        upload(site, [*files2, big])
        out = retrieve(site, "--accession", accession2, "--json")
        assert out.returncode == 1, out.stdout + out.stderr
        report = {s["study_instance_uid"]: s for s in json.loads(out.stdout)["studies"]}
        assert report[uid2]["state"] == "ok" and report[uid2]["received_instances"] == 8
        refused = report[str(ds.StudyInstanceUID)]
        assert refused["state"] == "failed" and refused["received_instances"] == 0
        assert (
            refused["status"] == 0xC000 and "0 arrived, 0 of 1 held here" in refused["explanation"]
        )
        out = retrieve(site, "--accession", accession2)
        assert out.returncode == 1
        assert f"{uid2}: C-MOVE success" in out.stdout

        # C-GET: the study comes back on our own association and is handed to the listener.
        uid3, files3 = small_study(tmp_path / "pacs", seed=44, slices=8)
        upload(site, files3)
        out = retrieve(site, uid3, "--json", method="get")
        assert out.returncode == 0, out.stdout + out.stderr
        (got,) = json.loads(out.stdout)["studies"]
        assert got["state"] == "ok" and got["received_instances"] == 8
        assert got["explanation"].startswith("C-GET success: 8 sent, 0 failed")
        wait_for(
            lambda: any(
                study_uid_of(site.database_url)[j.study_id] == uid3
                for j in jobs_of(site.database_url)
            ),
            120,
            "a job for the study fetched with C-GET",
        )
        assert not list(site.agent.data_dir.glob("retrieve-*"))  # nothing left behind

        engine = make_engine(site.database_url)
        try:
            with make_session_factory(engine)() as session:
                actions = list(
                    session.scalars(select(AuditEntry).where(AuditEntry.action == "retrieve"))
                )
                assert len(actions) == 6
                assert "not found" in actions[1].outcome
                assert session.scalar(select(Study.id).where(Study.study_instance_uid == uid2))
        finally:
            engine.dispose()


def test_an_unreachable_pacs_is_named_with_exit_code_4(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    env.update(
        PACS_AGENT_DATA_DIR=str(tmp_path / "var"),
        PACS_AGENT_QUERY_RETRIEVE__AE_TITLE="PACS",
        PACS_AGENT_QUERY_RETRIEVE__PORT=str(free_port()),
        PACS_AGENT_QUERY_RETRIEVE__TIMEOUT_S="5",
    )
    subprocess.run([sys.executable, "-m", "pacs_agent", "db", "upgrade"], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "retrieve", "1.2.3.4"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 4
    assert "the PACS cannot be queried" in out.stderr and "connection refused" in out.stderr
    # Not configured at all: exit 2, naming the settings.
    del env["PACS_AGENT_QUERY_RETRIEVE__AE_TITLE"]
    out = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "retrieve", "1.2.3.4"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "query_retrieve.ae_title" in out.stderr


def test_a_c_get_whose_listener_is_down_keeps_the_instances_and_says_where(
    tmp_path: Path,
) -> None:
    from tests.helpers.servers import Orthanc

    listener_port = free_port()
    orthanc = Orthanc(
        workdir=tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        modalities={"agent": ["PACSAGENT", "127.0.0.1", listener_port]},
    )
    orthanc.start()
    try:
        uid, files = small_study(tmp_path / "pacs", seed=45, slices=8)
        for f in files:
            orthanc.upload(f)
        data_dir = tmp_path / "var"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        env.update(
            PACS_AGENT_DATA_DIR=str(data_dir),
            PACS_AGENT_LISTENER__PORT=str(listener_port),  # nothing listens there
            PACS_AGENT_QUERY_RETRIEVE__AE_TITLE=orthanc.aet,
            PACS_AGENT_QUERY_RETRIEVE__PORT=str(orthanc.dicom_port),
            PACS_AGENT_QUERY_RETRIEVE__METHOD="get",
            PACS_AGENT_QUERY_RETRIEVE__TIMEOUT_S="10",
        )
        subprocess.run([sys.executable, "-m", "pacs_agent", "db", "upgrade"], env=env, check=True)
        out = subprocess.run(
            [sys.executable, "-m", "pacs_agent", "retrieve", uid],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        orthanc.stop()
    assert out.returncode == 4, out.stdout + out.stderr
    assert "got 8 instances from the PACS but our listener did not take them" in out.stdout
    (kept,) = data_dir.glob("retrieve-*")
    assert f"they are kept in {kept}" in out.stdout
    assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in kept.iterdir()) == sorted(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in files
    )
