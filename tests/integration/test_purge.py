"""``pacs-agent purge`` on SQLite and PostgreSQL: old studies lose their spool files, result
files and rows; a study with a job in flight, a recent one and one still receiving stay;
``--dry-run`` changes nothing; a purge killed midway is finished by the next run; every run
is audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import (
    AuditEntry,
    Export,
    Finding,
    Instance,
    InstanceCopy,
    Job,
    Series,
    Study,
)
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.paths import REPO

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


class Site:
    def __init__(self, tmp_path: Path, url: str | None) -> None:
        self.data_dir = tmp_path / "var"
        self.spool = self.data_dir / "spool"
        self.results = self.data_dir / "results"
        self.url = url or f"sqlite:///{self.data_dir}/pacs-agent.db"
        self.data_dir.mkdir(parents=True)
        upgrade(self.url, "head")
        self.engine = make_engine(self.url)
        self.sf = make_session_factory(self.engine)
        self.n = 0

    def study(self, days_idle: float, *job_states: str, status: str = "complete") -> str:
        """A study of 2 series x 3 instances with spool files, one kept copy, and per job a
        SEG and SR in results/, a finding and an export; idle for ``days_idle``."""
        self.n += 1
        uid = f"1.2.826.0.1.3680043.10.9999.{self.n}"
        at = NOW - timedelta(days=days_idle)
        with self.sf.begin() as s:
            st = Study(
                study_instance_uid=uid,
                accession_number=f"A{self.n}",
                study_date="20260101",
                status=status,
                first_received_at=at,
                last_received_at=at,
                completed_at=at if status == "complete" else None,
            )
            s.add(st)
            s.flush()
            for k in range(2):
                se = Series(study_id=st.id, series_instance_uid=f"{uid}.{k}", modality="CT")
                s.add(se)
                s.flush()
                for i in range(3):
                    rel = f"{uid}/{uid}.{k}/{uid}.{k}.{i}.dcm"
                    (self.spool / rel).parent.mkdir(parents=True, exist_ok=True)
                    (self.spool / rel).write_bytes(b"x" * 100)
                    inst = Instance(
                        series_id=se.id,
                        sop_instance_uid=f"{uid}.{k}.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=rel,
                        size_bytes=100,
                        sha256="0" * 64,
                        received_at=at,
                    )
                    s.add(inst)
                    s.flush()
                    if k == 0 and i == 0:
                        copy = f"duplicates/{uid}.copy.dcm"
                        (self.spool / copy).parent.mkdir(parents=True, exist_ok=True)
                        (self.spool / copy).write_bytes(b"y" * 50)
                        s.add(
                            InstanceCopy(
                                instance_id=inst.id,
                                path=copy,
                                size_bytes=50,
                                sha256="1" * 64,
                                transfer_syntax_uid="1.2.840.10008.1.2.1",
                                received_at=at,
                            )
                        )
            for state in job_states:
                job = Job(
                    study_id=st.id,
                    series_id=se.id,
                    model_name="demo",
                    status=state,
                    created_at=at,
                    updated_at=at,
                )
                s.add(job)
                s.flush()
                job.seg_path = f"{uid}/{job.id}/SEG.dcm"
                job.sr_path = f"{uid}/{job.id}/SR.dcm"
                for rel in (job.seg_path, job.sr_path):
                    (self.results / rel).parent.mkdir(parents=True, exist_ok=True)
                    (self.results / rel).write_bytes(b"r" * 10)
                s.add(
                    Finding(
                        job_id=job.id,
                        segment_number=1,
                        label="spleen",
                        code_value="78961009",
                        code_scheme="SCT",
                        code_meaning="Spleen",
                        detected=True,
                    )
                )
                s.add(
                    Export(
                        job_id=job.id,
                        destination="pacs",
                        sop_instance_uid=f"{uid}.99",
                        status="sent",
                        attempted_at=at,
                    )
                )
            s.flush()  # the column's onupdate set updated_at to now: back to the past
            s.execute(update(Job).where(Job.study_id == st.id).values(updated_at=at))
        return uid

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        env["PACS_AGENT_DATA_DIR"] = str(self.data_dir)
        env["PACS_AGENT_DATABASE__URL"] = self.url
        return subprocess.run(
            [sys.executable, "-m", "pacs_agent", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def count(self, model: type, **where: object) -> int:
        with self.sf() as s:
            q = select(func.count()).select_from(model)
            for k, v in where.items():
                q = q.where(getattr(model, k) == v)
            return int(s.scalar(q) or 0)

    def files_of(self, uid: str) -> list[Path]:
        found = [p for p in self.spool.rglob(f"{uid}*") if p.is_file()]
        return found + [p for p in (self.results / uid).rglob("*") if p.is_file()]


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    s = Site(tmp_path, url)
    request.addfinalizer(s.engine.dispose)
    return s


def test_purge_removes_old_studies_files_then_rows_and_keeps_busy_recent_and_receiving_ones(
    site: Site,
) -> None:
    old = site.study(40, "exported", "superseded")
    old_failed = site.study(40, "failed")
    busy = site.study(40, "exported", "running")
    recent = site.study(5, "exported")
    receiving = site.study(40, status="receiving")
    assert len(site.files_of(old)) == 7 + 4

    # Dry run: says what would go, changes nothing, is audited.
    out = site.cli("purge", "--older-than-days", "30", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    plan = {r["study_instance_uid"]: r for r in json.loads(out.stdout)}
    assert {u for u, r in plan.items() if r["action"] == "would-purge"} == {old, old_failed}
    assert plan[busy]["why"] == "a job is in flight (running)"
    assert plan[receiving]["why"] == "still receiving instances"
    assert recent not in plan  # not even a candidate
    assert plan[old]["files"] == 11 and plan[old]["bytes"] == 690
    assert len(site.files_of(old)) == 11 and site.count(Study) == 5

    out = site.cli("purge", "--older-than-days", "30")
    assert out.returncode == 0, out.stderr
    assert f"purged {old}: no activity for 40.0 days (11 files, 690 bytes)" in out.stdout
    assert "2 studies purged (20 files, 1360 bytes), 2 kept" in out.stderr
    for uid in (old, old_failed):
        assert site.files_of(uid) == []
        assert site.count(Study, study_instance_uid=uid) == 0
        assert not (site.spool / uid).exists() and not (site.results / uid).exists()
    for uid in (busy, receiving):
        assert site.count(Study, study_instance_uid=uid) == 1
    assert len(site.files_of(busy)) == 11 and len(site.files_of(recent)) == 9
    # Rows of the purged studies are gone everywhere, nothing dangling.
    assert site.count(Job) == 3 and site.count(Finding) == 3 and site.count(Export) == 3
    assert site.count(Instance) == 18 and site.count(InstanceCopy) == 3
    assert site.count(Series) == 6

    # Nothing left to do: exit 3. A named study in flight is refused and said so: exit 3.
    assert site.cli("purge", "--older-than-days", "30").returncode == 3
    out = site.cli("purge", "--study", busy)
    assert out.returncode == 3 and f"kept {busy}: a job is in flight (running)" in out.stdout
    out = site.cli("purge", "--study", "1.2.3.4")
    assert out.returncode == 3 and "kept 1.2.3.4: no such study" in out.stdout
    # A named study goes whatever its age.
    out = site.cli("purge", "--study", recent, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["action"] == "purged"
    assert site.files_of(recent) == [] and site.count(Study, study_instance_uid=recent) == 0

    with site.sf() as s:
        entries = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "purge")))
    assert len(entries) == 6
    assert json.loads(entries[0].arguments)["dry_run"] is True
    assert entries[1].outcome == "2 studies purged, 20 files, 1360 bytes, 2 kept"


def test_a_purge_killed_between_files_and_rows_is_finished_by_the_next_run(site: Site) -> None:
    uid = site.study(40, "exported")
    kept = site.study(1, "exported")
    # What a purge killed after step 2 leaves: the study marked, some files gone, rows kept.
    with site.sf.begin() as s:
        s.execute(
            Study.__table__.update().values(status="purging").where(Study.study_instance_uid == uid)
        )
    victims = site.files_of(uid)[:4]
    for p in victims:
        p.unlink()
    out = site.cli("purge", "--older-than-days", "365", "--json")
    assert out.returncode == 0, out.stderr
    (r,) = json.loads(out.stdout)
    assert r["action"] == "purged" and "finishing" in r["why"]
    assert site.files_of(uid) == [] and site.count(Study, study_instance_uid=uid) == 0
    assert len(site.files_of(kept)) == 9


def test_purge_without_a_selection_needs_the_retention_setting(site: Site) -> None:
    out = site.cli("purge")
    assert out.returncode == 2 and "retention.days" in out.stderr
    site.study(10, "exported")
    config = site.data_dir / "pacs-agent.toml"
    config.write_text("[retention]\ndays = 7\n")
    out = site.cli("--config", str(config), "purge", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["action"] == "purged"


def test_a_late_instance_during_a_purge_keeps_the_study_and_only_older_rows_go(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacs_agent import purge as purge_module
    from pacs_agent.db.index import StoredFile, index_instance
    from pacs_agent.dicom.header import InstanceHeader
    from pacs_agent.domain.retention import PurgePolicy

    uid = site.study(40, "exported")
    late_rel = f"{uid}/{uid}.0/{uid}.0.late.dcm"
    prune = purge_module._prune_dirs
    arrived: list[bool] = []

    def late_instance_arrives(start: Path, stop: Path) -> None:
        # Between the purge's file removal and its row deletion, the listener stores and
        # indexes a late instance of the study (the real index path re-opens it).
        prune(start, stop)
        if arrived:
            return
        arrived.append(True)
        (site.spool / late_rel).parent.mkdir(parents=True, exist_ok=True)
        (site.spool / late_rel).write_bytes(b"z" * 70)
        header = InstanceHeader(
            study_instance_uid=uid,
            series_instance_uid=f"{uid}.0",
            sop_instance_uid=f"{uid}.0.late",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            patient_id=None,
            accession_number=None,
            study_date=None,
            study_description=None,
            series_description=None,
            body_part_examined=None,
            series_number=None,
            instance_number=None,
        )
        stored = StoredFile(late_rel, 70, "2" * 64, "1.2.840.10008.1.2.1", "CT1")
        index_instance(site.sf, header, stored, datetime.now(UTC), reopen=True)

    monkeypatch.setattr(purge_module, "_prune_dirs", late_instance_arrives)
    (result,) = purge_module.purge(
        site.sf,
        site.spool,
        site.results,
        PurgePolicy(older_than=timedelta(days=30)),
        dry_run=False,
        actor="test",
        now=datetime.now(UTC),
    )
    assert result.action == "reopened" and "late instance" in result.why
    with site.sf() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert study.status == "receiving"
        paths = list(s.scalars(select(Instance.path)))
    # Only the late instance is left, and its file is there; the old jobs went.
    assert paths == [late_rel] and (site.spool / late_rel).is_file()
    assert site.count(Job) == 0 and site.count(Export) == 0 and site.count(InstanceCopy) == 0
