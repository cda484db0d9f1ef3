"""``pacs-agent studies list|show``, ``purge`` and ``retrieve``.

Exit codes: the ones of :mod:`pacs_agent.cli.jobs` (0 done, 1 done in part, 2 invalid
arguments or settings, 3 nothing matched), plus 4: the PACS could not be reached, or
refused or failed the retrieve. The logic lives in :mod:`pacs_agent.studies`,
:mod:`pacs_agent.purge` and :mod:`pacs_agent.retrieve`; these functions only parse and print.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from typing import Annotated, Any

import typer

from pacs_agent.cli.common import session_factory, settings_from
from pacs_agent.cli.jobs import (
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ActorOpt,
    JsonOpt,
    _actor,
    _fail,
)

EXIT_PEER = 4

studies_app = typer.Typer(help="Studies: list and show.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(studies_app, name="studies")
    app.command("purge")(purge)
    app.command("retrieve")(retrieve)


PatientOpt = Annotated[
    bool,
    typer.Option("--with-patient-id", help="Include the Patient ID (left out by default)."),
]


def _date(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.replace("-", "")
    if len(text) != 8 or not text.isdigit():
        raise _fail(f"{value!r} is not a date (YYYYMMDD or YYYY-MM-DD)")
    return text


@studies_app.command("list")
def studies_list(
    ctx: typer.Context,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Only studies with a series of it.")
    ] = None,
    date_from: Annotated[
        str | None, typer.Option("--from", help="StudyDate on or after (YYYYMMDD).")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="StudyDate on or before (YYYYMMDD).")
    ] = None,
    accession: Annotated[str | None, typer.Option("--accession")] = None,
    ai: Annotated[
        str | None,
        typer.Option("--ai", help="AI state: none, in_progress, failed or done."),
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="receiving, complete or purging.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many.")] = 0,
    with_patient_id: PatientOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List received studies, newest first (patient-free identifiers unless asked)."""
    from pacs_agent.domain.retention import AIStatus
    from pacs_agent.studies import StudyFilter, list_studies

    try:
        ai_state = AIStatus(ai) if ai else None
    except ValueError as exc:
        raise _fail(f"--ai {ai!r}: one of {', '.join(a.value for a in AIStatus)}") from exc
    flt = StudyFilter(
        modality=modality,
        date_from=_date(date_from),
        date_to=_date(date_to),
        accession_number=accession,
        ai_status=ai_state,
        status=status,
    )
    rows = list_studies(
        session_factory(settings_from(ctx)),
        flt,
        limit=limit,
        offset=offset,
        with_patient_id=with_patient_id,
    )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        pid = f" patient {r['patient_id']}" if with_patient_id else ""
        typer.echo(
            f"{r['study_instance_uid']}  acc {r['accession_number'] or '-'}  "
            f"{r['study_date'] or '-'}  {','.join(r['modalities']) or '-'}  "
            f"{r['series']} series {r['instances']} instances  {r['status']}  "
            f"AI {r['ai_status']} ({r['jobs']} jobs){pid}"
        )
    typer.echo(f"{len(rows)} studies", err=True)


@studies_app.command("show")
def studies_show(
    ctx: typer.Context,
    study_uid: Annotated[str | None, typer.Argument(help="Study Instance UID.")] = None,
    accession: Annotated[str | None, typer.Option("--accession")] = None,
    with_patient_id: PatientOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A study in full: series, instance counts, jobs, findings and exports."""
    from pacs_agent.studies import StudyNotFound, show_study

    if (study_uid is None) == (accession is None):
        raise _fail("give a STUDY_UID or --accession (one of them)")
    try:
        studies = show_study(
            session_factory(settings_from(ctx)),
            study_uid=study_uid,
            accession_number=accession,
            with_patient_id=with_patient_id,
        )
    except StudyNotFound as exc:
        raise _fail(str(exc), EXIT_NOTHING) from exc
    if as_json:
        typer.echo(json.dumps(studies if accession else studies[0], indent=2))
        return
    for s in studies:
        typer.echo(f"study {s['study_instance_uid']}")
        for key in ("accession_number", "study_date", "study_description", "status", "ai_status"):
            typer.echo(f"  {key}: {s[key]}")
        if with_patient_id:
            typer.echo(f"  patient_id: {s['patient_id']}")
        typer.echo(f"  received: {s['first_received_at']} .. {s['last_received_at']}")
        typer.echo(f"  {len(s['series'])} series, {s['instances']} instances")
        for se in s["series"]:
            typer.echo(
                f"    series {se['series_instance_uid']} #{se['series_number']} "
                f"{se['modality']} {se['series_description'] or ''}: {se['instances']} instances"
            )
        for j in s["jobs"]:
            reason = f" ({j['reason']})" if j["reason"] else ""
            typer.echo(f"  job {j['id']} {j['model']} {j['status']}{reason}")
            for f in j["findings"]:
                typer.echo(
                    f"    finding {f['kind']} {f['number']} {f['label']}: "
                    f"detected={f['detected']} volume_mm3={f['volume_mm3']} "
                    f"probability={f['probability']}"
                )
            for e in j["exports"]:
                typer.echo(
                    f"    export to {e['destination']} attempt {e['attempt']}: {e['status']}"
                    + (f" ({e['error']})" if e["error"] else "")
                )


def purge(
    ctx: typer.Context,
    older_than_days: Annotated[
        float | None,
        typer.Option(
            "--older-than-days",
            min=0,
            help="Studies with no activity for N days (default: retention.days).",
        ),
    ] = None,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="This Study Instance UID (repeatable).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would go.")] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove old studies: spool files, results, then their rows (never one in flight).

    Safe to run from cron and to run again after a crash midway.
    """
    from pacs_agent.db.models import utcnow
    from pacs_agent.domain.retention import PurgePolicy
    from pacs_agent.purge import StudyPurge
    from pacs_agent.purge import purge as do_purge

    settings = settings_from(ctx)
    days = older_than_days if older_than_days is not None else None
    if days is None and not study:
        if settings.retention.days is None:
            raise _fail("say what to purge: --older-than-days N, --study UID, or retention.days")
        days = float(settings.retention.days)
    policy = PurgePolicy(
        older_than=timedelta(days=days) if days is not None else None,
        study_uids=frozenset(study or ()),
    )

    def progress(r: StudyPurge) -> None:
        """One line per study as it is done (kept ones only when named)."""
        if as_json or (r.action == "kept" and not study):
            return
        size = f" ({r.files} files, {r.bytes} bytes)" if r.action != "kept" else ""
        typer.echo(f"{r.action} {r.study_instance_uid}: {r.why}{size}")

    results = do_purge(
        session_factory(settings),
        settings.spool_dir,
        settings.results_dir,
        policy,
        dry_run=dry_run,
        actor=_actor(actor),
        now=utcnow(),
        progress=progress,
    )
    gone = [r for r in results if r.action != "kept"]
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in results], indent=2))
    else:
        typer.echo(
            f"{len(gone)} studies {'would be ' if dry_run else ''}purged "
            f"({sum(r.files for r in gone)} files, {sum(r.bytes for r in gone)} bytes), "
            f"{len(results) - len(gone)} kept",
            err=True,
        )
    if not gone:
        raise typer.Exit(EXIT_NOTHING)
    named_kept = [r for r in results if r.action == "kept" and study]
    raise typer.Exit(EXIT_PARTIAL if named_kept else EXIT_OK)


def retrieve(
    ctx: typer.Context,
    study_uid: Annotated[str | None, typer.Argument(help="Study Instance UID.")] = None,
    accession: Annotated[str | None, typer.Option("--accession")] = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a study from the PACS (C-FIND, then C-MOVE to our listener); the running
    ``pacs-agent serve`` receives and processes it as if it had been pushed."""
    from pacs_agent.db.models import utcnow
    from pacs_agent.retrieve import RetrieveError
    from pacs_agent.retrieve import retrieve as do_retrieve

    if (study_uid is None) == (accession is None):
        raise _fail("give a STUDY_UID or --accession (one of them)")
    settings = settings_from(ctx)
    try:
        report = do_retrieve(
            settings,
            session_factory(settings),
            study_uid=study_uid,
            accession_number=accession,
            actor=_actor(actor),
            now=utcnow(),
        )
    except RetrieveError as exc:
        code = {"settings": EXIT_USAGE, "not_found": EXIT_NOTHING}.get(exc.kind, EXIT_PEER)
        if as_json:
            typer.echo(json.dumps({"error": exc.kind, "message": str(exc)}, indent=2))
        raise _fail(str(exc), code) from exc
    if as_json:
        out: dict[str, Any] = {
            "destination": report.destination,
            "studies": [
                {
                    "study_instance_uid": s.study_instance_uid,
                    "accession_number": s.accession_number,
                    "state": s.state,
                    "expected_instances": s.expected_instances,
                    "received_instances": s.received_instances,
                    "held_instances": s.held_instances,
                    "explanation": s.explanation,
                    **asdict(s.outcome),
                }
                for s in report.studies
            ],
        }
        typer.echo(json.dumps(out, indent=2))
    else:
        for s in report.studies:
            typer.echo(f"{s.study_instance_uid}: {s.explanation}")
            for uid in s.outcome.failed_sop_instance_uids:
                typer.echo(f"  failed: {uid}")
    if report.all_ok:
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(EXIT_PARTIAL if report.any_sent else EXIT_PEER)
