"""``pacs-agent jobs list|show`` and the admin commands ``reprocess``, ``retry``, ``cancel``.

Exit codes (the same for every command here):

- 0: done (for ``list``: jobs were listed, possibly none);
- 1: some jobs could not be changed (another process moved them, or the broker refused);
- 2: invalid arguments or settings;
- 3: nothing matched (no such job, study or state).

Every command that changes something writes an audit entry: who, what, when, the outcome.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pacs_agent.cli.common import session_factory, settings_from

if TYPE_CHECKING:
    from pacs_agent.admin import JobFilter

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3

jobs_app = typer.Typer(help="Jobs: list and show.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
    app.command("reprocess")(reprocess)
    app.command("retry")(retry)
    app.command("cancel")(cancel)


StatusOpt = Annotated[
    list[str] | None, typer.Option("--status", "-s", help="Only jobs in this state (repeatable).")
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Only jobs of this model.")]
StudyOpt = Annotated[
    str | None, typer.Option("--study", help="Only jobs of this Study Instance UID.")
]
AccessionOpt = Annotated[
    str | None, typer.Option("--accession", help="Only jobs of studies with this accession.")
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="Jobs created at or after this date or time (ISO 8601, UTC)."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="Jobs created before this date or time (a date: up to its end)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="Who to record in the audit log (default: user@host).")
]


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _when(value: str | None, *, end: bool) -> datetime | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _fail(f"{value!r} is not an ISO 8601 date or time") from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _filter(
    status: list[str] | None,
    model: str | None,
    study: str | None,
    accession: str | None,
    since: str | None,
    until: str | None,
    job_ids: list[int] | None = None,
) -> JobFilter:
    from pacs_agent.admin import JobFilter
    from pacs_agent.domain.jobs import JobStatus

    try:
        statuses = tuple(JobStatus(s) for s in status or ())
    except ValueError as exc:
        known = ", ".join(s.value for s in JobStatus)
        raise _fail(f"{exc}; states are: {known}") from exc
    return JobFilter(
        statuses=statuses,
        model=model,
        study_uid=study,
        accession_number=accession,
        created_from=_when(since, end=False),
        created_to=_when(until, end=True),
        job_ids=tuple(job_ids or ()),
    )


def _actor(actor: str | None) -> str:
    from pacs_agent.admin import default_actor

    return actor or default_actor()


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: StatusOpt = None,
    model: ModelOpt = None,
    study: StudyOpt = None,
    accession: AccessionOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first); 0: all.")] = 500,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    from pacs_agent.admin import list_jobs

    flt = _filter(status, model, study, accession, since, until)
    rows = list_jobs(session_factory(settings_from(ctx)), flt, limit or None)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        reason = f"  ({r['reason']})" if r["reason"] else ""
        typer.echo(
            f"{r['id']:>6} {r['status']:<14} {r['model']} {r['model_version'] or '-'}  "
            f"{r['study_instance_uid']}  {r['created_at']}{reason}"
        )


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(help="The job id (see jobs list).")],
    as_json: JsonOpt = False,
) -> None:
    """Show one job: its state and reason, times, findings and export attempts."""
    from sqlalchemy import select

    from pacs_agent.admin import JobFilter, list_jobs
    from pacs_agent.db.models import Export, Finding

    sf = session_factory(settings_from(ctx))
    rows = list_jobs(sf, JobFilter(job_ids=(job_id,)), None)
    if not rows:
        raise _fail(f"no job {job_id}", EXIT_NOTHING)
    job: dict[str, Any] = rows[0]
    with sf() as session:
        job["findings"] = [
            {
                "segment_number": f.segment_number,
                "label": f.label,
                "code": f"({f.code_value}, {f.code_scheme}, {f.code_meaning!r})",
                "detected": f.detected,
                "volume_mm3": f.volume_mm3,
                "component_count": f.component_count,
                "largest_component_mm3": f.largest_component_mm3,
                "flag": f.flag,
            }
            for f in session.scalars(
                select(Finding).where(Finding.job_id == job_id).order_by(Finding.id)
            )
        ]
        job["exports"] = [
            {
                "destination": e.destination,
                "sop_instance_uid": e.sop_instance_uid,
                "status": e.status,
                "dicom_status": e.dicom_status,
                "error": e.error,
                "attempted_at": e.attempted_at.isoformat(),
            }
            for e in session.scalars(
                select(Export).where(Export.job_id == job_id).order_by(Export.id)
            )
        ]
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    for key, value in job.items():
        if key in ("findings", "exports"):
            continue
        if value is not None:
            typer.echo(f"{key:>22}: {value}")
    for f in job["findings"]:
        typer.echo(f"{'finding':>22}: {f}")
    for e in job["exports"]:
        typer.echo(f"{'export':>22}: {e}")


def reprocess(
    ctx: typer.Context,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Study Instance UID (repeatable).")
    ] = None,
    accession: Annotated[
        list[str] | None, typer.Option("--accession", help="Accession number (repeatable).")
    ] = None,
    date_from: Annotated[
        str | None, typer.Option("--from", help="StudyDate from (YYYYMMDD or YYYY-MM-DD).")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="StudyDate to, inclusive (YYYYMMDD or YYYY-MM-DD).")
    ] = None,
    model: ModelOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also redo series whose results already exist.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be done; change nothing.")
    ] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the models again on complete studies (by UID, accession number or StudyDate).

    New jobs go through the routing rules (``--model`` keeps one model); the running
    ``pacs-agent serve`` sends them. Series whose job is still in progress are skipped, and
    so are series with results unless ``--force``.
    """
    from pacs_agent.admin import StudySelector
    from pacs_agent.admin import reprocess as do_reprocess
    from pacs_agent.catalog import load_catalog
    from pacs_agent.db.models import utcnow
    from pacs_agent.scheduler import rules_from

    def day(v: str | None) -> str | None:
        if v is None:
            return None
        digits = v.replace("-", "")
        if len(digits) != 8 or not digits.isdigit():
            raise _fail(f"{v!r} is not a date (YYYYMMDD or YYYY-MM-DD)")
        return digits

    sel = StudySelector(tuple(study or ()), tuple(accession or ()), day(date_from), day(date_to))
    if sel.is_empty():
        raise _fail("say which studies: --study, --accession, or --from/--to")
    settings = settings_from(ctx)
    sf = session_factory(settings)
    catalog = load_catalog(settings.models_dir)
    if model is not None and model not in catalog.models:
        raise _fail(f"model {model!r} is not in the catalog ({', '.join(sorted(catalog.models))})")

    from pacs_agent.admin import find_studies

    with sf() as session:
        n_studies = len(find_studies(session, sel))
    if n_studies == 0:
        raise _fail("no complete study matches", EXIT_NOTHING)
    show_bar = n_studies > 1 and not as_json and sys.stderr.isatty()
    with typer.progressbar(
        length=n_studies, label="reprocessing", file=sys.stderr, hidden=not show_bar
    ) as bar:
        plan = do_reprocess(
            sf,
            catalog,
            rules_from(settings),
            sel,
            model=model,
            force=force,
            dry_run=dry_run,
            actor=_actor(actor),
            now=utcnow(),
            progress=bar.update,
        )
    created = [r for r in plan if r.action == "create"]
    if as_json:
        typer.echo(json.dumps([vars(r) for r in plan], indent=2))
    else:
        for r in plan:
            verb = ("would create" if dry_run else "created") if r.action == "create" else "skip"
            job = f" job {r.job_id}" if r.job_id else ""
            where = f" series {r.series_instance_uid}" if r.series_instance_uid else ""
            typer.echo(f"{verb}{job}: {r.model}{where} of study {r.study_instance_uid}: {r.why}")
        typer.echo(
            f"{n_studies} studies, {len(created)} jobs "
            + ("would be created (dry run)" if dry_run else "created"),
            err=True,
        )
    if not created:
        raise typer.Exit(EXIT_NOTHING)


def _report(result: Any, verb: str, as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    verb: result.moved,
                    "unchanged": [{"id": i, "why": w} for i, w in result.unchanged],
                },
                indent=2,
            )
        )
    else:
        for i in result.moved:
            typer.echo(f"{verb} job {i}")
        for i, why in result.unchanged:
            typer.echo(f"unchanged job {i}: {why}")


def retry(
    ctx: typer.Context,
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids (or use filters).")] = None,
    status: StatusOpt = None,
    model: ModelOpt = None,
    study: StudyOpt = None,
    accession: AccessionOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Try failed and export_failed jobs again (by id, or every one the filters match).

    A failed job runs again from the start (attempts reset); an export_failed job is
    exported again. Without --status, both states are retried.
    """
    from pacs_agent.admin import retry as do_retry
    from pacs_agent.admin import send_exports
    from pacs_agent.db.models import utcnow
    from pacs_agent.domain.jobs import JobStatus
    from pacs_agent.queue import CeleryDispatcher, make_celery

    statuses = status or ["failed", "export_failed"]
    flt = _filter(statuses, model, study, accession, since, until, job_ids)
    bad = [s for s in flt.statuses if s not in (JobStatus.FAILED, JobStatus.EXPORT_FAILED)]
    if bad:
        raise _fail("retry takes --status failed or --status export_failed")
    settings = settings_from(ctx)
    result = do_retry(session_factory(settings), flt, actor=_actor(actor), now=utcnow())
    code = EXIT_OK if result.moved else EXIT_NOTHING
    if result.exports_to_send:
        dispatcher = CeleryDispatcher(make_celery(settings))
        for job_id, why in send_exports(dispatcher.send_export, result.exports_to_send):
            typer.echo(f"job {job_id}: {why}", err=True)
            code = EXIT_PARTIAL
    _report(result, "retried", as_json)
    if result.unchanged and code == EXIT_OK and job_ids:
        code = EXIT_PARTIAL
    raise typer.Exit(code)


def cancel(
    ctx: typer.Context,
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids (or use filters).")] = None,
    status: StatusOpt = None,
    model: ModelOpt = None,
    study: StudyOpt = None,
    accession: AccessionOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel jobs that have not finished (pending, queued, running, failed, export_failed)."""
    from pacs_agent.admin import cancel as do_cancel
    from pacs_agent.db.models import utcnow

    flt = _filter(status, model, study, accession, since, until, job_ids)
    if flt.is_empty():
        raise _fail("say which jobs: ids or filters (--status, --model, --study, ...)")
    result = do_cancel(session_factory(settings_from(ctx)), flt, actor=_actor(actor), now=utcnow())
    _report(result, "cancelled", as_json)
    if not result.moved:
        raise typer.Exit(EXIT_NOTHING)
    raise typer.Exit(EXIT_PARTIAL if result.unchanged and job_ids else EXIT_OK)
