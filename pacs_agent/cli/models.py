"""``pacs-agent models ...``: the model catalog: list, validate, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pacs_agent.cli.common import settings_from

models_app = typer.Typer(help="The model catalog.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


def _describe_card(r: dict[str, Any]) -> str:
    use = "clinical" if r["clinical_use"] else "NOT for clinical use"
    outputs = [s["label"] for s in r["segments"]] + [f["label"] for f in r["findings"]]
    accepts = ",".join(r["accepts"]["modality"]) or "any modality"
    return (
        f"{r['name']} {r['version']} ({r['task']}, {use}; accepts {accepts}; "
        f"outputs {', '.join(outputs)}): {r['bundle']}"
    )


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
            typer.echo(_describe_card(r))
        for e in catalog.errors:
            typer.echo(f"error: {e}", err=True)
    if catalog.errors:
        raise typer.Exit(1)


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the models in the catalog, and any bundle that cannot be used (exit status 1).

    Reads the model cards only (no torch); ``models validate`` also loads each bundle.
    """
    _report(settings_from(ctx).models_dir, as_json)


def _runtime_problems(bundles: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Errors per bundle (path string) from loading each bundle as a worker would, in a worker
    process (``python -m workers.validation``): this command never loads torch itself. A
    bundle gets an error saying so when that process fails or says nothing about it."""
    if not bundles:
        return {}
    root = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-m", "workers.validation", *map(str, bundles)]
    done = subprocess.run(args, cwd=root, check=False, capture_output=True, text=True)
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        for entry in json.loads(lines[-1])["bundles"]:
            found[str(entry["bundle"])] = list(entry["errors"])
    except (IndexError, ValueError, KeyError, TypeError):
        pass
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    for bundle in bundles:
        if str(bundle) not in found:
            message = (
                f"{bundle}: not checked: python -m workers.validation exited with status "
                f"{done.returncode}: {tail}"
            )
            found[str(bundle)] = [{"file": None, "key": None, "line": None, "message": message}]
    return found


@models_app.command("validate")
def models_validate(
    directory: Annotated[
        Path, typer.Argument(help="A models directory (one bundle per folder), or one bundle.")
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every bundle under DIRECTORY (or the one bundle DIRECTORY is) as a worker would
    load it: the model card, the inference configuration parsed and built with MONAI (every
    reference the runtime resolves), the weights loaded into the network. Nothing is run.
    Exit status 0 when all are valid, 1 when one is not; errors name the file and the key.
    """
    from pacs_agent.catalog import is_bundle, load_bundle, load_catalog

    target = directory.expanduser().resolve()
    single = target.is_dir() and is_bundle(target)
    taken_as = "bundle" if single else "models directory"
    catalog = load_bundle(target) if single else load_catalog(target)
    problems: dict[str, list[dict[str, Any]]] = {}
    for problem in catalog.problems:
        problems.setdefault(str(problem.bundle), []).append(problem.as_dict())
    if target.is_dir() and not catalog.bundles:
        message = f"{target}: no bundle found (expected one folder per bundle, or a bundle)"
        problems[str(target)] = [{"file": None, "key": None, "line": None, "message": message}]
    cards = {str(card.bundle_dir): card for card in catalog.models.values()}
    for bundle, errors in _runtime_problems([c.bundle_dir for c in cards.values()]).items():
        if errors:
            problems.setdefault(bundle, []).extend(errors)
    order = [str(b) for b in catalog.bundles] + [b for b in problems if b not in cards]
    entries: list[dict[str, Any]] = [
        {
            "bundle": bundle,
            "name": cards[bundle].name if bundle in cards else None,
            "valid": not problems.get(bundle),
            "errors": problems.get(bundle, []),
        }
        for bundle in dict.fromkeys(order)
    ]
    valid = [cards[e["bundle"]].as_dict() for e in entries if e["valid"] and e["bundle"] in cards]
    messages = [error["message"] for e in entries for error in e["errors"]]
    if as_json:
        report = {
            "directory": str(target),
            "taken_as": taken_as,
            "valid": not messages,
            "bundles": entries,
            "models": valid,
            "errors": messages,
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        count = f"{len(catalog.bundles)} bundle(s)"
        typer.echo(f"{taken_as} {target}" + ("" if single else f": {count}"))
        for row in valid:
            typer.echo(f"valid: {_describe_card(row)}")
        for message in messages:
            typer.echo(f"error: {message}", err=True)
    if messages:
        raise typer.Exit(1)


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
