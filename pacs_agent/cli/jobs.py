"""``pacs-agent jobs ...`` and the admin commands on jobs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pacs_agent.cli.common import session_factory, settings_from

jobs_app = typer.Typer(help="Jobs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from pacs_agent.db.models import Job, Study

    sf = session_factory(settings_from(ctx))
    with sf() as session:
        q = select(Job, Study.study_instance_uid).join(Study).order_by(Job.id.desc())
        if status:
            q = q.where(Job.status == status)
        rows = [
            {
                "id": j.id,
                "study": uid,
                "model": j.model_name,
                "version": j.model_version,
                "status": j.status,
                "reason": j.reason,
                "attempts": j.attempts,
                "created_at": j.created_at.isoformat(),
            }
            for j, uid in session.execute(q.limit(500))
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        reason = f"  ({r['reason']})" if r["reason"] else ""
        typer.echo(
            f"{r['id']:>6} {r['status']:<14} {r['model']} {r['version']}  {r['study']}{reason}"
        )
