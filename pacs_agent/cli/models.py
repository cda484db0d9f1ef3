"""``pacs-agent models ...``: the model catalog: list, validate, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from pacs_agent.cli.common import settings_from

models_app = typer.Typer(help="The model catalog.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


def _report(directory: Path, as_json: bool) -> None:
    from pacs_agent.catalog import load_catalog

    catalog = load_catalog(directory)
    rows = [c.as_dict() for c in catalog.models.values()]
    if as_json:
        typer.echo(
            json.dumps(
                {"directory": str(directory), "models": rows, "errors": list(catalog.errors)},
                indent=2,
            )
        )
    else:
        for r in rows:
            use = "clinical" if r["clinical_use"] else "NOT for clinical use"
            outputs = [s["label"] for s in r["segments"]] + [f["label"] for f in r["findings"]]
            accepts = ",".join(r["accepts"]["modality"]) or "any modality"
            typer.echo(
                f"{r['name']} {r['version']} ({r['task']}, {use}; accepts {accepts}; "
                f"outputs {', '.join(outputs)}): {r['bundle']}"
            )
        for e in catalog.errors:
            typer.echo(f"error: {e}", err=True)
    if catalog.errors:
        raise typer.Exit(1)


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the models in the catalog, and any bundle that cannot be used (exit status 1)."""
    _report(settings_from(ctx).models_dir, as_json)


@models_app.command("validate")
def models_validate(
    directory: Annotated[Path, typer.Argument(help="A models directory (one bundle per folder).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every bundle and model card under DIRECTORY; exit status 1 when one is invalid."""
    _report(directory.expanduser().resolve(), as_json)


@models_app.command("evaluate")
def models_evaluate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name from the catalog.")],
    dataset: Annotated[
        Path, typer.Option("--dataset", help="Case folders (+ labels.csv or reference SEGs).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: <dataset>/evaluation).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Default: worker.device.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run MODEL over a labelled data set: Dice and HD95 per label, or accuracy, precision,
    recall, specificity and ROC AUC; writes report.json and PNG plots.

    Runs in a worker process (``python -m workers.evaluation``): this command never loads torch
    itself. Exit status 2 when the model or the data set cannot be used.
    """
    settings = settings_from(ctx)
    target = (out or dataset / "evaluation").expanduser().resolve()
    args = [
        sys.executable,
        "-m",
        "workers.evaluation",
        model,
        "--dataset",
        str(dataset.expanduser().resolve()),
        "--models-dir",
        str(settings.models_dir),
        "--out",
        str(target),
        "--device",
        device or settings.worker.device,
    ]
    if as_json:
        args.append("--json")
    root = Path(__file__).resolve().parents[2]
    code = subprocess.run(args, cwd=root, check=False).returncode
    if code:
        raise typer.Exit(code)
