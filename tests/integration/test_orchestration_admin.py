"""The administrator's commands against a running agent, a real PACS and a real worker:
``rules test``, ``jobs list|show``, ``reprocess``, ``retry``, ``cancel``, their exit codes and
the audit log."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.models import AuditEntry
from pacs_agent.db.session import make_engine, make_session_factory
from tests.helpers.orchestration import jobs_of
from tests.helpers.servers import wait_for
from tests.integration.test_orchestration import make_site

pytestmark = pytest.mark.integration

RULES = """
[[models.rules]]
name = "ct"
modality = ["CT"]
image_type_excludes = ["LOCALIZER"]
models = ["demo_ct_blob_seg"]

[[models.rules]]
name = "broken"
calling_ae_title = ["BROKEN"]
models = ["no_such_model"]
"""


def _audit(database_url: str) -> list[AuditEntry]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    finally:
        engine.dispose()


def test_admin_commands_list_explain_reprocess_retry_and_cancel_with_an_audit_trail(
    tmp_path: Path,
) -> None:
    env = {"PACS_AGENT_EXPORT__MAX_ATTEMPTS": "1"}
    with make_site(tmp_path, None, env=env, config_toml=RULES) as site:
        good = site.send(31)
        odd = site.send(32, calling_ae="BROKEN")
        wait_for(lambda: len(jobs_of(site.database_url)) == 3, 60, "three jobs")
        wait_for(
            lambda: sum(j.status == "exported" for j in jobs_of(site.database_url)) == 2,
            180,
            "two exported jobs",
        )

        # rules test: which models run on which series, and why not.
        out = site.cli("rules", "test", good)
        assert out.returncode == 0, out.stderr
        assert "rule ct: runs demo_ct_blob_seg" in out.stdout
        assert "rule broken: no: sent by ['TESTSCU'], not by ['BROKEN']" in out.stdout
        out = site.cli("rules", "test", odd, "--json")
        explained = json.loads(out.stdout)
        assert {r["model"] for r in explained["runs"]} == {"demo_ct_blob_seg", "no_such_model"}
        (facts,) = explained["series"]
        # What the listener indexed for the rules: from the headers received over DICOM.
        assert facts["image_type"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert facts["slice_thickness"] == 2.0
        assert facts["sop_class_uids"] == ["1.2.840.10008.5.1.4.1.1.2"]
        assert facts["calling_ae_titles"] == ["BROKEN"]
        assert facts["body_part_examined"] == "ABDOMEN" and facts["num_instances"] == 12
        assert site.cli("rules", "test", "1.2.3.4").returncode == 3

        # jobs list and show, with filters.
        out = site.cli("jobs", "list", "--status", "failed", "--json")
        (failed,) = json.loads(out.stdout)
        assert failed["model"] == "no_such_model" and "not in the catalog" in failed["reason"]
        out = site.cli("jobs", "list", "--study", good, "--model", "demo_ct_blob_seg", "--json")
        (exported,) = json.loads(out.stdout)
        assert exported["status"] == "exported"
        today = datetime.now(UTC).date().isoformat()
        out = site.cli("jobs", "list", "--since", today, "--until", today, "--json")
        assert len(json.loads(out.stdout)) == 3
        out = site.cli("jobs", "list", "--until", "2000-01-01", "--json")
        assert json.loads(out.stdout) == []
        out = site.cli("jobs", "show", str(exported["id"]), "--json")
        shown = json.loads(out.stdout)
        assert shown["findings"] and {e["status"] for e in shown["exports"]} == {"sent"}
        assert site.cli("jobs", "show", "999999").returncode == 3
        assert site.cli("jobs", "list", "--status", "bogus").returncode == 2

        # reprocess: without --force nothing is redone; a dry run changes nothing.
        out = site.cli("reprocess", "--study", good, "--actor", "test-admin")
        assert out.returncode == 3 and "already has results" in out.stdout
        out = site.cli("reprocess", "--study", good, "--force", "--dry-run", "--actor", "t")
        assert out.returncode == 0 and "would create" in out.stdout
        assert len(jobs_of(site.database_url)) == 3
        out = site.cli(
            "reprocess", "--from", "1900-01-01", "--to", "29991231", "--dry-run", "--force"
        )
        assert out.returncode == 0 and out.stdout.count("would create") == 3, out.stdout
        out = site.cli("reprocess", "--from", "29990101", "--dry-run")
        assert out.returncode == 3
        assert site.cli("reprocess", "--from", "yesterday").returncode == 2
        assert len(jobs_of(site.database_url)) == 3
        assert site.cli("reprocess").returncode == 2
        assert site.cli("reprocess", "--accession", "NO-SUCH").returncode == 3

        # retry a failed job: it runs again and fails again, with its reason.
        out = site.cli("retry", "--actor", "test-admin", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["retried"] == [failed["id"]]
        wait_for(
            lambda: (
                next(j for j in jobs_of(site.database_url) if j.id == failed["id"]).status
                == "failed"
                and next(j for j in jobs_of(site.database_url) if j.id == failed["id"]).attempts
                == 1
            ),
            60,
            "the retried job to fail again",
        )

        # export_failed: the PACS is down while a reprocessed job exports; retry once it is up.
        site.orthanc.stop()
        out = site.cli("reprocess", "--accession", "DEMO000000000031", "--force")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(
            lambda: any(j.status == "export_failed" for j in jobs_of(site.database_url)),
            120,
            "an export_failed job",
        )
        site.orthanc.start()
        out = site.cli("retry", "--status", "export_failed", "--actor", "test-admin")
        assert out.returncode == 0, out.stdout + out.stderr
        live = [j for j in jobs_of(site.database_url) if j.status not in ("superseded", "failed")]
        assert len(live) == 2
        wait_for(
            lambda: all(
                j.status == "exported"
                for j in jobs_of(site.database_url)
                if j.status not in ("superseded", "failed")
            ),
            120,
            "the retried export",
        )
        site.one_seg_and_sr_per_study([good])

        # cancel: needs a target; finished jobs cannot be cancelled; pending ones can.
        assert site.cli("cancel").returncode == 2
        assert site.cli("cancel", str(exported["id"])).returncode == 3
        site.agent.stop()  # nothing dispatches now: a reprocessed job stays pending
        out = site.cli("reprocess", "--study", odd, "--force", "--model", "demo_ct_blob_seg")
        assert out.returncode == 0, out.stdout + out.stderr
        out = site.cli("cancel", "--status", "pending", "--actor", "test-admin", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        (cancelled,) = json.loads(out.stdout)["cancelled"]
        job = next(j for j in jobs_of(site.database_url) if j.id == cancelled)
        assert job.status == "cancelled" and job.reason == "cancelled by test-admin"

        audit = _audit(site.database_url)
        actions = [(a.action, a.actor) for a in audit]
        assert ("retry", "test-admin") in actions and ("cancel", "test-admin") in actions
        assert [a.action for a in audit].count("reprocess") >= 4
        retried = next(a for a in audit if a.action == "retry")
        assert json.loads(retried.job_ids) == [failed["id"]]
        assert all(a.at.tzinfo is not None for a in audit)
