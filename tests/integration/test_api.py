"""The HTTP API of a running ``pacs-agent serve``: lists with filters and pages, roles,
reprocess/retry/cancel through the CLI's transitions and audit rows, /health, /ready and
/metrics, and bad input refused with a reason and no change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.api import ADMIN_TOKEN, DONE, READ_TOKEN, api_site
from tests.helpers.orchestration import jobs_of
from tests.helpers.servers import free_port, wait_for

pytestmark = pytest.mark.integration


def test_api_lists_a_received_study_and_its_job_and_admins_reprocess_it_with_an_audit_row(
    tmp_path: Path,
) -> None:
    with api_site(tmp_path) as site:
        # Health and readiness need no token.
        assert site.get("/health", token=None).json() == {"status": "alive"}
        ready = site.get("/ready", token=None)
        assert ready.status_code == 200, ready.text

        # Studies, with filters.
        studies = site.get("/api/v1/studies").json()
        assert studies["total"] == 1
        (study,) = studies["items"]
        assert study["study_instance_uid"] == site.study_uid
        assert study["modalities"] == ["CT"] and study["instance_count"] == 12
        assert study["ai_status"] == "done" and study["findings"]
        assert "patient_id" not in study and "patient_name" not in study
        assert site.get("/api/v1/studies", modality="MR").json()["total"] == 0
        assert site.get("/api/v1/studies", status="complete").json()["total"] == 1
        one = site.get(f"/api/v1/studies/{site.study_uid}").json()
        assert len(one["series"]) == 1 and one["series"][0]["instance_count"] == 12

        # Jobs, findings, series; pages.
        jobs = site.get("/api/v1/jobs").json()
        (job,) = jobs["items"]
        assert job["status"] in DONE and job["model"] == "demo_ct_blob_seg"
        assert site.get("/api/v1/jobs", status="failed").json()["total"] == 0
        assert site.get("/api/v1/jobs", study_instance_uid=site.study_uid).json()["total"] == 1
        assert site.get("/api/v1/jobs", created_until="2000-01-01").json()["total"] == 0
        detail = site.get(f"/api/v1/jobs/{job['id']}").json()
        assert detail["seg_sop_instance_uid"] and detail["sr_sop_instance_uid"]
        assert [e["event"] for e in detail["timeline"]][:3] == ["created", "queued", "running"]
        findings = site.get("/api/v1/findings", job_id=job["id"]).json()
        assert findings["total"] == len(detail["findings"]) > 0
        last = findings["total"] - 1
        page = site.get("/api/v1/findings", job_id=job["id"], limit=1, offset=last).json()
        assert page["limit"] == 1 and page["offset"] == last and len(page["items"]) == 1
        assert page["items"][0]["id"] == findings["items"][-1]["id"]
        past = site.get("/api/v1/findings", job_id=job["id"], offset=last + 1).json()
        assert past["items"] == [] and past["total"] == findings["total"]
        assert site.get("/api/v1/series", study_instance_uid=site.study_uid).json()["total"] == 1
        assert site.get("/api/v1/exports").json()["total"] == 0  # no destination configured

        # Tokens: none, unknown, read-only on an admin action.
        assert site.get("/api/v1/jobs", token=None).status_code == 401
        bad = site.get("/api/v1/jobs", token="not-a-known-token-at-all")
        assert bad.status_code == 401 and "unknown token" in bad.json()["detail"]
        with site.client(READ_TOKEN) as c:
            refused = c.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert refused.status_code == 403 and "read only" in refused.json()["detail"]

        # Bad input: a clear 4xx with the reason, and nothing changes.
        before = [(j.id, j.status) for j in jobs_of(site.database_url)]
        assert site.get("/api/v1/jobs/999999").json()["detail"] == "no job 999999"
        assert site.get("/api/v1/jobs", status="bogus").status_code == 422
        assert site.get("/api/v1/jobs", limit=0).status_code == 422
        assert site.get("/api/v1/studies/1.2.3.999").status_code == 404
        with site.client(ADMIN_TOKEN) as c:
            assert c.post("/api/v1/jobs/999999/retry").status_code == 404
            nothing = c.post(f"/api/v1/jobs/{job['id']}/retry")
            assert nothing.status_code == 409 and "only failed" in nothing.json()["detail"]
            no_cancel = c.post(f"/api/v1/jobs/{job['id']}/cancel")
            assert no_cancel.status_code == 409 and "cannot be cancelled" in no_cancel.text
            unforced = c.post(f"/api/v1/studies/{site.study_uid}/reprocess", json={})
            assert unforced.status_code == 409 and "already has results" in unforced.text
            bad_model = c.post(
                f"/api/v1/studies/{site.study_uid}/reprocess", json={"model": "nope"}
            )
            assert bad_model.status_code == 422 and "not in the catalog" in bad_model.text
        assert [(j.id, j.status) for j in jobs_of(site.database_url)] == before

        # Reprocess (forced): a new job, the old one superseded, an audit row naming the token.
        with site.client(ADMIN_TOKEN) as c:
            done = c.post(f"/api/v1/studies/{site.study_uid}/reprocess", json={"force": True})
        assert done.status_code == 200, done.text
        (new_id,) = done.json()["created"]
        statuses = {j.id: j.status for j in jobs_of(site.database_url)}
        assert statuses[job["id"]] == "superseded"
        (entry,) = site.get("/api/v1/audit").json()["items"]
        assert entry["action"] == "reprocess" and entry["job_ids"] == [new_id]
        assert entry["actor"].startswith("api:admin:") and ADMIN_TOKEN not in entry["actor"]
        assert site.get("/api/v1/audit", action="retry").json()["total"] == 0

        # Cancel the new job before or while it runs, or see it done; either way audited.
        wait_for(
            lambda: (
                {j.id: j.status for j in jobs_of(site.database_url)}[new_id] not in ("pending",)
            ),
            60,
            "the new job to be sent",
        )
        with site.client(ADMIN_TOKEN) as c:
            cancelled = c.post(f"/api/v1/jobs/{new_id}/cancel")
        if cancelled.status_code == 200:
            assert cancelled.json()["moved"] == [new_id]
            assert site.get("/api/v1/audit", action="cancel").json()["total"] == 1
        else:
            assert cancelled.status_code == 409, cancelled.text

        # Metrics: database figures and the listener's association counters (one rejected:
        # a C-ECHO to a called AE title the listener does not answer to).
        from pacs_agent.net.scu import echo

        refused = echo(host="127.0.0.1", port=site.agent.port, called_ae="NOTUS", calling_ae="T")
        assert refused is None
        metrics = site.get("/metrics").text
        assert "pacs_agent_instances_received_total 12.0" in metrics
        # The helper's C-ECHO when it started the agent, and storescu's association.
        assert 'pacs_agent_associations_total{result="accepted"} 2.0' in metrics
        assert 'pacs_agent_associations_total{result="rejected"} 1.0' in metrics
        assert 'pacs_agent_jobs{state="superseded"} 1.0' in metrics
        assert 'pacs_agent_inference_seconds_count{model="demo_ct_blob_seg"}' in metrics
        assert "pacs_agent_spool_free_bytes" in metrics
        assert site.get("/metrics", token=None).status_code == 401

        # The access log has paths, never query strings (an accession number stays out).
        site.get("/api/v1/jobs", accession_number="ACC-SECRET-1")
        log = site.agent.log_tail(200_000)
        assert "GET /api/v1/jobs 200" in log and "ACC-SECRET-1" not in log
        assert ADMIN_TOKEN not in log and READ_TOKEN not in log


def test_api_refuses_to_start_on_a_network_address_without_a_token(tmp_path: Path) -> None:
    env = {
        "PACS_AGENT_DATA_DIR": str(tmp_path / "var"),
        "PACS_AGENT_API__HOST": "0.0.0.0",
        "PACS_AGENT_API__PORT": str(free_port()),
    }
    for command in (["api"], ["serve", "--no-worker"]):
        out = subprocess.run(
            [sys.executable, "-m", "pacs_agent", *command],
            env={**_clean_env(), **env, "PACS_AGENT_LISTENER__PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert "refusing to start" in out.stderr and "api.host" in out.stderr


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}


def test_api_alone_is_alive_and_not_ready_without_its_broker_or_database(tmp_path: Path) -> None:
    """``pacs-agent api`` by itself: /health answers; /ready says 503 with the reason when the
    embedded broker's directory is missing (no serve has run) or the database is down."""
    import httpx

    from pacs_agent.db.migrate import upgrade

    data = tmp_path / "var"
    upgrade(f"sqlite:///{data / 'pacs-agent.db'}")
    port = free_port()
    env = {**_clean_env(), "PACS_AGENT_DATA_DIR": str(data), "PACS_AGENT_API__PORT": str(port)}
    down = {**env, "PACS_AGENT_API__PORT": str(free_port())}
    down["PACS_AGENT_DATABASE__URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    procs = [
        subprocess.Popen([sys.executable, "-m", "pacs_agent", "api"], env=e, cwd=tmp_path)
        for e in (env, down)
    ]
    try:
        for e in (env, down):
            url = f"http://127.0.0.1:{e['PACS_AGENT_API__PORT']}"

            def alive(url: str = url) -> bool:
                try:
                    return httpx.get(url + "/health").json() == {"status": "alive"}
                except httpx.HTTPError:
                    return False

            wait_for(alive, 60, "pacs-agent api to answer")
        ready = httpx.get(f"http://127.0.0.1:{port}/ready")
        assert ready.status_code == 503
        assert "embedded broker directory" in ready.json()["problems"][0]
        (data / "broker").mkdir()
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        # Open on loopback (no token): the metrics come from the database; no listener here.
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "pacs_agent_database_up 1.0" in metrics
        assert "pacs_agent_associations_total" not in metrics
        bad = httpx.get(f"http://127.0.0.1:{down['PACS_AGENT_API__PORT']}/ready")
        assert bad.status_code == 503
        assert any("database unreachable" in p for p in bad.json()["problems"])
        bad_metrics = httpx.get(f"http://127.0.0.1:{down['PACS_AGENT_API__PORT']}/metrics")
        assert bad_metrics.status_code == 200 and "pacs_agent_database_up 0.0" in bad_metrics.text
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_readiness_sees_a_real_broker_and_names_one_that_is_down(kind: str, tmp_path: Path) -> None:
    from pacs_agent.api.app import broker_problem
    from pacs_agent.config import load_settings
    from tests.helpers.orchestration import shared_broker_url

    url = shared_broker_url(kind)
    assert url is not None
    up = load_settings(data_dir=tmp_path, broker={"url": url})
    assert broker_problem(up) is None
    scheme = url.split("://", 1)[0]
    down = load_settings(data_dir=tmp_path, broker={"url": f"{scheme}://127.0.0.1:{free_port()}"})
    problem = broker_problem(down)
    assert problem is not None and problem.startswith("broker unreachable")
