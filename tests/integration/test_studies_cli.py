"""``pacs-agent studies list|show``: filters, pagination, the AI state of each study, one
study in full; patient-free unless asked; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update

from pacs_agent.db.models import Series, Study
from tests.integration.test_purge import Site

pytestmark = pytest.mark.integration


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, None)


def test_studies_list_filters_pages_and_leaves_the_patient_out(site: Site) -> None:
    done = site.study(3, "exported", "superseded")
    failed = site.study(2, "failed")
    busy = site.study(1, "exported", "running")
    none = site.study(0)
    with site.sf.begin() as s:
        s.execute(update(Study).values(patient_id="PAT-SECRET"))
        s.execute(
            update(Study).where(Study.study_instance_uid == none).values(study_date="20261201")
        )
        s.execute(
            update(Series).where(Series.series_instance_uid == f"{failed}.1").values(modality="SEG")
        )

    out = site.cli("studies", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["study_instance_uid"] for r in rows] == [none, busy, failed, done]  # newest first
    states = {r["study_instance_uid"]: r["ai_status"] for r in rows}
    assert states == {done: "done", failed: "failed", busy: "in_progress", none: "none"}
    first = rows[-1]
    assert first["series"] == 2 and first["instances"] == 6 and first["jobs"] == 2
    assert first["modalities"] == ["CT"] and first["accession_number"] == "A1"
    assert "PAT-SECRET" not in out.stdout and "patient_id" not in first

    def uids(*args: str) -> list[str]:
        out = site.cli("studies", "list", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [r["study_instance_uid"] for r in json.loads(out.stdout)]

    assert uids("--ai", "failed") == [failed]
    assert uids("--ai", "in_progress") == [busy]
    assert uids("--modality", "SEG") == [failed]
    assert uids("--from", "2026-12-01") == [none]
    assert uids("--to", "20261130") == [busy, failed, done]
    assert uids("--accession", "A2") == [failed]
    assert uids("--limit", "2") == [none, busy]
    assert uids("--limit", "2", "--offset", "2") == [failed, done]
    assert uids("--ai", "done", "--offset", "1") == []
    out = site.cli("studies", "list", "--with-patient-id", "--json")
    assert json.loads(out.stdout)[0]["patient_id"] == "PAT-SECRET"
    out = site.cli("studies", "list")
    assert f"{done}  acc A1  20260101  CT  2 series 6 instances  complete  AI done" in out.stdout
    assert site.cli("studies", "list", "--ai", "maybe").returncode == 2


def test_studies_show_gives_series_jobs_findings_and_exports(site: Site) -> None:
    uid = site.study(3, "exported", "superseded")
    out = site.cli("studies", "show", uid, "--json")
    assert out.returncode == 0, out.stderr
    study = json.loads(out.stdout)
    assert study["instances"] == 6 and study["ai_status"] == "done"
    assert [s["instances"] for s in study["series"]] == [3, 3]
    assert [s["size_bytes"] for s in study["series"]] == [300, 300]
    assert [j["status"] for j in study["jobs"]] == ["exported", "superseded"]
    (finding,) = study["jobs"][0]["findings"]
    assert finding["label"] == "spleen" and finding["code"] == "(78961009, SCT, 'Spleen')"
    (export,) = study["jobs"][0]["exports"]
    assert export["destination"] == "pacs" and export["status"] == "sent"
    # By accession number (a list: an accession may name several studies).
    out = site.cli("studies", "show", "--accession", "A1", "--json")
    assert [s["study_instance_uid"] for s in json.loads(out.stdout)] == [uid]
    out = site.cli("studies", "show", uid)
    assert "2 series, 6 instances" in out.stdout and "export to pacs attempt 1: sent" in out.stdout
    # Not there: exit 3; neither or both of UID and accession: exit 2.
    missing = site.cli("studies", "show", "1.2.3.4")
    assert missing.returncode == 3 and "no study with Study Instance UID 1.2.3.4" in missing.stderr
    assert site.cli("studies", "show").returncode == 2
    assert site.cli("studies", "show", uid, "--accession", "A1").returncode == 2
