"""``pacs-agent models ...``: the model catalog."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pacs_agent.cli.common import settings_from

models_app = typer.Typer(help="The model catalog.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the models in the catalog, and any bundle that cannot be used."""
    from pacs_agent.catalog import load_catalog

    catalog = load_catalog(settings_from(ctx).models_dir)
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
