"""The dashboard: server-rendered pages (Jinja2, no front-end build).

- ``/``: the reading worklist: recent studies (UID, accession, date, modality; never a
  patient name or ID), their AI status, findings and flag, time since arrival;
- ``/jobs/{id}``: a job's timeline, reason, SEG/SR UIDs, export attempts, the SEG over a
  slice (``/jobs/{id}/overlay.png``), and for admins reprocess / retry / cancel buttons.

Sign-in is a form that sets the token in an HttpOnly, SameSite=Strict cookie; every POST form
carries a CSRF token derived from that token (pacs_agent.api.auth.TokenBook.csrf_token).
"""

from __future__ import annotations

import urllib.parse
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from pacs_agent.admin import CANCELLABLE
from pacs_agent.api import actions
from pacs_agent.api.auth import Principal
from pacs_agent.api.deps import COOKIE, app_state, bearer
from pacs_agent.api.overlay import OverlayError, render_overlay
from pacs_agent.db import queries
from pacs_agent.db.models import Instance, Job, utcnow
from pacs_agent.db.session import read_session
from pacs_agent.domain.retention import IN_FLIGHT

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(FilePath(__file__).parent / "templates"))
PAGE = 50
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def ago(iso: str | None, now: datetime | None = None) -> str:
    """'5 min', '3 h', '2 d' since an ISO time."""
    if not iso:
        return ""
    seconds = ((now or utcnow()) - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 60:
        return f"{max(int(seconds), 0)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{int(seconds // 86400)} d"


templates.env.filters["ago"] = ago


def _token(request: Request) -> str | None:
    return bearer(request) or request.cookies.get(COOKIE)


def _who(request: Request) -> Principal | None:
    return app_state(request).tokens.principal(_token(request))


def _login_redirect(request: Request) -> RedirectResponse:
    target = urllib.parse.quote(request.url.path)
    return RedirectResponse(f"/login?next={target}", status_code=303)


def _render(request: Request, name: str, who: Principal, **context: Any) -> HTMLResponse:
    state = app_state(request)
    return templates.TemplateResponse(
        request,
        name,
        {
            "who": who,
            "csrf": state.tokens.csrf_token(_token(request)),
            "open_mode": state.tokens.open,
            "message": request.query_params.get("message"),
            "error": request.query_params.get("error"),
            **context,
        },
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "login.html", {"next": request.query_params.get("next", "/"), "error": None}
    )


def _safe_next(target: str) -> str:
    # Only a path on this site: never an open redirect.
    return target if target.startswith("/") and not target.startswith("//") else "/"


@router.post("/login", response_model=None)
def login(
    request: Request,
    token: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=512)] = "/",
) -> Response:
    state = app_state(request)
    if state.tokens.principal(token) is None or state.tokens.open:
        return templates.TemplateResponse(
            request,
            "login.html",
            {"next": next, "error": "unknown token"},
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse, response_model=None)
def worklist(request: Request, offset: int = 0) -> Response:
    who = _who(request)
    if who is None:
        return _login_redirect(request)
    offset = min(max(offset, 0), 10_000_000)
    with read_session(app_state(request).session_factory) as session:
        page = queries.list_studies(
            session, queries.StudyFilter(), queries.PageRequest(PAGE, offset)
        )
    return _render(request, "worklist.html", who, page=page, now=utcnow())


def _job_or_404(request: Request, job_id: int) -> queries.JobDetail:
    with read_session(app_state(request).session_factory) as session:
        job = queries.get_job(session, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}", response_class=HTMLResponse, response_model=None)
def job_page(request: Request, job_id: JobId) -> Response:
    who = _who(request)
    if who is None:
        return _login_redirect(request)
    job = _job_or_404(request, job_id)
    return _render(
        request,
        "job.html",
        who,
        job=job.as_json(),
        retryable=job.summary["status"] in {s.value for s in actions.RETRYABLE},
        cancellable=job.summary["status"] in {s.value for s in CANCELLABLE},
        reprocessable=job.summary["status"] not in {s.value for s in IN_FLIGHT},
        now=utcnow(),
    )


@router.get("/jobs/{job_id}/overlay.png")
def overlay(request: Request, job_id: JobId) -> Response:
    if _who(request) is None:
        raise HTTPException(401, "sign in first")
    state = app_state(request)
    with read_session(state.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if not job.seg_path:
            raise HTTPException(404, f"job {job_id} has no SEG")
        sources = [
            state.settings.spool_dir / p
            for p in session.scalars(
                select(Instance.path).where(Instance.series_id == job.series_id)
            )
        ]
        seg = state.settings.results_dir / job.seg_path
    try:
        png = render_overlay(seg, sources)
    except OverlayError as exc:
        raise HTTPException(404, f"job {job_id}: {exc}") from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def _admin_post(request: Request, csrf: str) -> Principal:
    who = _who(request)
    if who is None:
        raise HTTPException(401, "sign in first")
    if not app_state(request).tokens.csrf_ok(_token(request), csrf):
        raise HTTPException(403, "the form is stale or not from this site (CSRF token)")
    if not who.is_admin:
        raise HTTPException(403, "this token may read only")
    return who


def _back(job_id: int, *, message: str | None = None, error: str | None = None) -> Response:
    query = urllib.parse.urlencode({"message": message} if message else {"error": error or ""})
    return RedirectResponse(f"/jobs/{job_id}?{query}", status_code=303)


@router.post("/jobs/{job_id}/retry")
def retry(request: Request, job_id: JobId, csrf: Annotated[str, Form(max_length=128)]) -> Response:
    who = _admin_post(request, csrf)
    state = app_state(request)
    try:
        actions.retry_job(state.settings, state.session_factory, job_id, who.actor)
    except actions.NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except actions.ActionError as exc:
        return _back(job_id, error=str(exc))
    return _back(job_id, message=f"job {job_id} retried")


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: JobId, csrf: Annotated[str, Form(max_length=128)]) -> Response:
    who = _admin_post(request, csrf)
    state = app_state(request)
    try:
        actions.cancel_job(state.session_factory, job_id, who.actor)
    except actions.NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except actions.ActionError as exc:
        return _back(job_id, error=str(exc))
    return _back(job_id, message=f"job {job_id} cancelled")


@router.post("/jobs/{job_id}/reprocess")
def reprocess(
    request: Request, job_id: JobId, csrf: Annotated[str, Form(max_length=128)]
) -> Response:
    """Run the job's model again on its study (forced: the old results are superseded)."""
    who = _admin_post(request, csrf)
    state = app_state(request)
    job = _job_or_404(request, job_id)
    try:
        outcome = actions.reprocess_study(
            state.settings,
            state.session_factory,
            job.summary["study_instance_uid"],
            model=job.summary["model"],
            force=True,
            dry_run=False,
            actor=who.actor,
        )
    except actions.ActionError as exc:
        return _back(job_id, error=str(exc))
    new = outcome.created[0]
    return RedirectResponse(
        f"/jobs/{new}?" + urllib.parse.urlencode({"message": f"reprocessed as job {new}"}),
        status_code=303,
    )
