"""The ``pacs-agent`` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pacs_agent.cli import findings as findings_cli
from pacs_agent.cli import jobs as jobs_cli
from pacs_agent.cli import models as models_cli
from pacs_agent.cli import notify as notify_cli
from pacs_agent.cli import rules as rules_cli
from pacs_agent.cli import studies as studies_cli
from pacs_agent.cli.common import config_file_from, settings_from, setup_logging
from pacs_agent.config import CONFIG_ENV, effective_settings

app = typer.Typer(
    help="pacs-agent: AI results for your PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"TOML settings file (default: ${CONFIG_ENV})."),
]


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None) -> None:
    ctx.ensure_object(dict)["config"] = config
    if config is not None:
        # Subprocesses (the embedded worker) read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked) as JSON."""
    typer.echo(json.dumps(effective_settings(settings_from(ctx)), indent=2))


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Migrate the database schema up to REVISION (default: head)."""
    from pacs_agent.config import mask_url
    from pacs_agent.db.migrate import upgrade

    settings = settings_from(ctx)
    upgrade(settings.database_url, revision)
    typer.echo(f"database {mask_url(settings.database_url)} at {revision}")


@db_app.command("downgrade")
def db_downgrade(ctx: typer.Context, revision: str) -> None:
    """Migrate the database schema down to REVISION ('base' removes every table)."""
    from pacs_agent.db.migrate import downgrade

    downgrade(settings_from(ctx).database_url, revision)
    typer.echo(f"database at {revision}")


@app.command()
def serve(
    ctx: typer.Context,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Run workers apart.")] = False,
) -> None:
    """Run the DICOM listener and the scheduler (and an embedded worker)."""
    from pacs_agent.service import serve as run_serve

    settings = settings_from(ctx)
    setup_logging(settings)
    config = config_file_from(ctx)
    raise typer.Exit(
        run_serve(
            settings, config_file=config, with_worker=settings.worker.embedded and not no_worker
        )
    )


@app.command()
def api(ctx: typer.Context) -> None:
    """Run the HTTP API, metrics and dashboard alone (``serve`` also runs them)."""
    from pacs_agent.api.server import run

    settings = settings_from(ctx)
    setup_logging(settings)
    raise typer.Exit(run(settings))


@app.command()
def worker(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queue names.")] = None,
    concurrency: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads")] = "prefork",
) -> None:
    """Start a Celery worker (inference and/or io queues)."""
    settings_from(ctx)  # validate before starting anything
    args = [sys.executable, "-m", "workers", "--pool", pool]
    config = config_file_from(ctx)
    if config is not None:
        args += ["--config", str(config)]
    for flag, value in (("--queues", queues), ("--concurrency", concurrency), ("--device", device)):
        if value is not None:
            args += [flag, str(value)]
    os.execv(sys.executable, args)


@app.command()
def echo(
    ctx: typer.Context,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int | None, typer.Option()] = None,
    ae_title: Annotated[str | None, typer.Option()] = None,
) -> None:
    """C-ECHO a DICOM peer (default: this agent's own listener)."""
    from pacs_agent.net.scu import echo as c_echo

    s = settings_from(ctx)
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
        run_demo(settings_from(ctx), config_file=config_file_from(ctx), timeout_s=timeout)
    )


# Command groups that live in their own modules.
models_cli.register(app)
jobs_cli.register(app)
rules_cli.register(app)
findings_cli.register(app)
notify_cli.register(app)
studies_cli.register(app)


if __name__ == "__main__":
    app()
