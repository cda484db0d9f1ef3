"""The ``pacs-agent`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pacs_agent.config import CONFIG_ENV, ConfigError, Settings, effective_settings, load_settings

app = typer.Typer(
    help="pacs-agent: AI results for your PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
models_app = typer.Typer(help="The model catalog.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"TOML settings file (default: ${CONFIG_ENV})."),
]


def _settings(ctx: typer.Context) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config"))
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    settings: Settings = obj["settings"]
    return settings


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, settings.logging.level_no))


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None) -> None:
    ctx.ensure_object(dict)["config"] = config
    if config is not None:
        # Subprocesses (the embedded worker) read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked) as JSON."""
    typer.echo(json.dumps(effective_settings(_settings(ctx)), indent=2))


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Migrate the database schema up to REVISION (default: head)."""
    from pacs_agent.config import mask_url
    from pacs_agent.db.migrate import upgrade

    settings = _settings(ctx)
    upgrade(settings.database_url, revision)
    typer.echo(f"database {mask_url(settings.database_url)} at {revision}")


@db_app.command("downgrade")
def db_downgrade(ctx: typer.Context, revision: str) -> None:
    """Migrate the database schema down to REVISION ('base' removes every table)."""
    from pacs_agent.db.migrate import downgrade

    downgrade(_settings(ctx).database_url, revision)
    typer.echo(f"database at {revision}")


@app.command()
def serve(
    ctx: typer.Context,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Run workers apart.")] = False,
) -> None:
    """Run the DICOM listener and the scheduler (and an embedded worker)."""
    from pacs_agent.service import serve as run_serve

    settings = _settings(ctx)
    _logging(settings)
    config = ctx.ensure_object(dict).get("config")
    raise typer.Exit(
        run_serve(
            settings, config_file=config, with_worker=settings.worker.embedded and not no_worker
        )
    )


@app.command()
def worker(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queue names.")] = None,
    concurrency: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads")] = "prefork",
) -> None:
    """Start a Celery worker (inference and/or io queues)."""
    _settings(ctx)  # validate before starting anything
    args = [sys.executable, "-m", "workers", "--pool", pool]
    config = ctx.ensure_object(dict).get("config")
    if config is not None:
        args += ["--config", str(config)]
    for flag, value in (("--queues", queues), ("--concurrency", concurrency), ("--device", device)):
        if value is not None:
            args += [flag, str(value)]
    os.execv(sys.executable, args)


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the models in the catalog, and any bundle that cannot be used."""
    from pacs_agent.catalog import load_catalog

    catalog = load_catalog(_settings(ctx).models_dir)
    rows = [
        {
            "name": c.name,
            "version": c.version,
            "task": c.task,
            "clinical_use": c.clinical_use,
            "accepts_modality": list(c.accepts_modality),
            "bundle": str(c.bundle_dir),
            "segments": [s.label for s in c.segments],
        }
        for c in catalog.models.values()
    ]
    if as_json:
        typer.echo(json.dumps({"models": rows, "errors": list(catalog.errors)}, indent=2))
    else:
        for r in rows:
            use = "clinical" if r["clinical_use"] else "NOT for clinical use"
            typer.echo(f"{r['name']} {r['version']} ({r['task']}, {use}): {r['bundle']}")
        for e in catalog.errors:
            typer.echo(f"error: {e}", err=True)
    if catalog.errors:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from pacs_agent.db.models import Job, Study
    from pacs_agent.db.session import make_engine, make_session_factory

    sf = make_session_factory(make_engine(_settings(ctx).database_url))
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


@app.command()
def echo(
    ctx: typer.Context,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int | None, typer.Option()] = None,
    ae_title: Annotated[str | None, typer.Option()] = None,
) -> None:
    """C-ECHO a DICOM peer (default: this agent's own listener)."""
    from pacs_agent.net.scu import echo as c_echo

    s = _settings(ctx)
    status = c_echo(
        host=host,
        port=port or s.listener.port,
        called_ae=ae_title or s.listener.ae_title,
        calling_ae=s.export.calling_ae_title,
    )
    if status is None:
        typer.echo("no association", err=True)
        raise typer.Exit(1)
    typer.echo(f"C-ECHO status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def demo(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 600.0,
) -> None:
    """Start the agent, send it a synthetic CT study over DICOM, print the AI findings."""
    from pacs_agent.demo.run import run_demo

    raise typer.Exit(
        run_demo(
            _settings(ctx), config_file=ctx.ensure_object(dict).get("config"), timeout_s=timeout
        )
    )


if __name__ == "__main__":
    app()
