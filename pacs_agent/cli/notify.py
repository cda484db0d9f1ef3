"""``pacs-agent notify list|retry``: the worklist notifications (HL7, FHIR, webhook).

Exit codes: 0 done; 1 some ids were left unchanged; 2 bad usage; 3 nothing matched.
``retry`` moves notifications back to ``pending``; the running service's sweep sends them on
the io queue within a poll interval (nothing is sent from this command).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pacs_agent.cli.common import session_factory, settings_from

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3

notify_app = typer.Typer(
    help="Worklist notifications: HL7 v2 ORU, FHIR DiagnosticReport, webhooks.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(notify_app, name="notify")


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@notify_app.command("list")
def notify_list(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="Only in this state (repeatable)."),
    ] = None,
    job: Annotated[int | None, typer.Option("--job", help="Only of this job.")] = None,
    notifier: Annotated[
        str | None, typer.Option("--notifier", help="Only to this notifier (its name).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """List notifications: state, attempts, last error, the receiver's last answer."""
    from pacs_agent.notify.outbox import STATES, list_notifications
    from pacs_agent.notify.outbox import as_json as row_json

    bad = [s for s in state or [] if s not in STATES]
    if bad:
        typer.echo(f"error: unknown state {bad}; one of {list(STATES)}", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = settings_from(ctx)
    with session_factory(settings)() as session:
        rows = list_notifications(
            session, states=state or (), job_id=job, notifier=notifier, limit=limit
        )
        data = [row_json(r) for r in rows]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for r in data:
            typer.echo(
                f"{r['id']} job {r['job_id']} {r['event']} -> {r['notifier']} ({r['kind']}) "
                f"[{r['state']}] attempts={r['attempts']} answer={r['response'] or '-'}"
                + (f" next={r['next_attempt_at']}" if r["state"] == "pending" else "")
                + (f" error: {r['last_error']}" if r["last_error"] else "")
            )
    if not data:
        raise typer.Exit(EXIT_NOTHING)


@notify_app.command("retry")
def notify_retry(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Notification ids.")] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Every notification in state failed.")
    ] = False,
    include_sent: Annotated[
        bool, typer.Option("--include-sent", help="Also send again notifications already sent.")
    ] = False,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who to record in the audit log.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send notifications again: failed ones (and sent ones with --include-sent) go back to
    pending with their attempts reset; the service sends them at once."""
    from pacs_agent.admin import audit, default_actor
    from pacs_agent.db.models import utcnow
    from pacs_agent.notify.outbox import FAILED, list_notifications, retry_notifications

    if not ids and not all_failed:
        typer.echo("error: give notification ids or --all-failed", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = settings_from(ctx)
    now = utcnow()
    with session_factory(settings).begin() as session:
        chosen = list(ids or [])
        if all_failed:
            chosen += [n.id for n in list_notifications(session, states=[FAILED], limit=100000)]
        result = retry_notifications(session, chosen, now, include_sent=include_sent)
        job_ids = {
            n.job_id for n in list_notifications(session, limit=100000) if n.id in result.moved
        }
        audit(
            session,
            actor or default_actor(),
            "notify-retry",
            {"ids": ids or [], "all_failed": all_failed, "include_sent": include_sent},
            f"{len(result.moved)} notification(s) pending again: {result.moved}",
            job_ids,
            now,
        )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "retried": result.moved,
                    "unchanged": [{"id": i, "why": w} for i, w in result.unchanged],
                },
                indent=2,
            )
        )
    else:
        for i in result.moved:
            typer.echo(f"notification {i}: pending again")
        for i, why in result.unchanged:
            typer.echo(f"notification {i} unchanged: {why}")
    if not result.moved:
        raise typer.Exit(EXIT_NOTHING)
    if result.unchanged:
        raise typer.Exit(EXIT_PARTIAL)
