"""The dashboard in a real browser (headless Debian chromium driven by Playwright): a study
sent over DICOM to a running ``pacs-agent serve`` shows on the worklist with its finding, the
job page shows the SEG over a slice, an admin's Reprocess makes a new job, a read-only token
sees no buttons, and a form without its CSRF token changes nothing. The API's own /docs and
/redoc pages render with no request leaving 127.0.0.1 (hospital networks reach no CDN).

Screenshots are kept under var/test-artifacts/dashboard/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.api import ADMIN_TOKEN, READ_TOKEN, api_site
from tests.helpers.orchestration import jobs_of
from tests.helpers.paths import REPO
from tests.helpers.servers import Agent, free_port, require_services, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "var" / "test-artifacts" / "dashboard"


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        if require_services():
            pytest.fail("chromium is required in CI (deploy/install-system-deps.sh)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _sign_in(browser: object, url: str, token: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(url + "/")
    assert page.url.startswith(url + "/login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    return context, page


def test_worklist_job_page_reprocess_and_read_only_view_in_a_real_browser(
    tmp_path: Path, browser: object
) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with api_site(tmp_path, seed=72) as site:
        (job,) = site.get("/api/v1/jobs").json()["items"]
        detail = site.get(f"/api/v1/jobs/{job['id']}").json()
        detected = [f["label"] for f in detail["findings"] if f["detected"]]
        assert detected, detail["findings"]

        # An admin signs in; the study is on the worklist with its finding.
        context, page = _sign_in(browser, site.url, ADMIN_TOKEN)
        row = page.locator(f"tr.study[data-study-uid='{site.study_uid}']")
        assert row.count() == 1
        assert detected[0] in row.locator("td.findings").inner_text()
        assert "CT" in row.inner_text() and "done" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "worklist-admin.png"), full_page=True)

        # The job page: timeline, SEG/SR UIDs and the SEG drawn over a slice.
        page.click(f"a[href='/jobs/{job['id']}']")
        page.wait_for_url(f"{site.url}/jobs/{job['id']}")
        assert page.inner_text("#seg-uid") == detail["seg_sop_instance_uid"]
        assert page.inner_text("#sr-uid") == detail["sr_sop_instance_uid"]
        assert "created" in page.inner_text("#timeline")
        png = context.request.get(f"{site.url}/jobs/{job['id']}/overlay.png")
        assert png.status == 200, site.agent.log_tail(3000)
        assert png.headers["content-type"] == "image/png"
        page.wait_for_function("document.getElementById('overlay').complete")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") == 512
        page.screenshot(path=str(ARTIFACTS / "job-admin.png"), full_page=True)

        # A form posted without its CSRF token is refused and changes nothing.
        before = [(j.id, j.status) for j in jobs_of(site.database_url)]
        forged = context.request.post(
            f"{site.url}/jobs/{job['id']}/reprocess", form={"csrf": "forged"}
        )
        assert forged.status == 403 and "CSRF" in forged.text()
        assert [(j.id, j.status) for j in jobs_of(site.database_url)] == before

        # Reprocess: a new job, shown at once.
        page.click("button[name=reprocess]")
        page.wait_for_url(f"{site.url}/jobs/*")
        new_id = int(page.url.split("/jobs/")[1].split("?")[0])
        assert new_id != job["id"]
        assert f"reprocessed as job {new_id}" in page.inner_text("main")
        statuses = {j.id: j.status for j in jobs_of(site.database_url)}
        assert statuses[job["id"]] == "superseded" and new_id in statuses
        page.screenshot(path=str(ARTIFACTS / "job-reprocessed.png"), full_page=True)
        context.close()

        # A read-only token sees the pages and no buttons.
        context, page = _sign_in(browser, site.url, READ_TOKEN)
        page.goto(f"{site.url}/jobs/{job['id']}")
        assert page.locator("#actions").count() == 0
        assert page.locator("button[name=reprocess]").count() == 0
        page.screenshot(path=str(ARTIFACTS / "job-read-only.png"), full_page=True)
        context.close()

        # A wrong token at the login form is refused.
        context = browser.new_context()  # type: ignore[attr-defined]
        page = context.new_page()
        page.goto(site.url + "/login")
        page.fill("input[name=token]", "not-a-token-0123456789")
        page.click("button[type=submit]")
        assert "unknown token" in page.inner_text("main")
        context.close()


def test_the_api_docs_render_every_operation_with_no_request_leaving_the_agent(
    tmp_path: Path, browser: object
) -> None:
    api_port = free_port()
    agent = Agent(
        workdir=tmp_path / "agent",
        port=free_port(),
        with_worker=False,
        env_overrides={"PACS_AGENT_API__PORT": str(api_port)},
    )
    agent.start()
    url = f"http://127.0.0.1:{api_port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API to answer")
        paths = httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
        assert "/api/v1/jobs" in paths
        context = browser.new_context()  # type: ignore[attr-defined]
        # What the pages ask for; what the browser refused by the pages' Content-Security-
        # Policy (never sent); what reached the network (only these could leave the machine).
        requested: list[str] = []
        failed: dict[str, str] = {}
        sent: list[str] = []
        context.on("request", lambda r: requested.append(r.url))
        context.on("requestfailed", lambda r: failed.__setitem__(r.url, r.failure))

        def network(route: object) -> None:
            request_url = route.request.url  # type: ignore[attr-defined]
            sent.append(request_url)
            if request_url.startswith(url + "/"):
                route.continue_()  # type: ignore[attr-defined]
            else:
                route.abort()  # type: ignore[attr-defined]

        context.route("**/*", network)
        page = context.new_page()

        page.goto(url + "/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        shown = set(page.locator(".opblock-summary-path").all_inner_texts())
        shown = {p.replace("\u200b", "") for p in shown}  # Swagger UI breaks long paths
        assert {"/api/v1/jobs", "/health", "/metrics"} <= shown, shown
        page.screenshot(path=str(tmp_path / "docs.png"))

        page.goto(url + "/redoc")
        page.wait_for_selector("[data-section-id^='tag/']", timeout=30_000)
        assert "/api/v1/jobs" in page.inner_text("body")
        context.close()

        assert any(u.endswith("/docs-assets/swagger-ui-bundle.js") for u in requested)
        assert any(u.endswith("/docs-assets/redoc.standalone.js") for u in requested)
        leaving = [u for u in sent if not u.startswith(url + "/")]
        assert not leaving, f"requests leaving the agent: {leaving}"
        # ReDoc's side menu asks for its vendor's logo: refused by the browser, never sent.
        # (blob: URLs are the page's own memory: ReDoc's search worker.)
        elsewhere = [u for u in requested if not u.removeprefix("blob:").startswith(url + "/")]
        assert all(failed.get(u) == "csp" for u in elsewhere), (elsewhere, failed)
    finally:
        agent.stop()
