"""``pacs-agent rules ...``: the routing rules, tried on a study already received."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pacs_agent.cli.common import session_factory, settings_from

rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of a received study.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Which models the rules would run on each series of a study, and why not for others.

    Exit 0 when some model would run, 1 when none would, 3 when the study is unknown.
    """
    from sqlalchemy import select

    from pacs_agent.catalog import load_catalog
    from pacs_agent.db.jobs import series_facts
    from pacs_agent.db.models import Study
    from pacs_agent.domain.routing import explain, select_models
    from pacs_agent.scheduler import rules_from

    settings = settings_from(ctx)
    rules = rules_from(settings)
    with session_factory(settings)() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        if study_id is None:
            typer.echo(f"error: no study {study_uid} in the index", err=True)
            raise typer.Exit(3)
        facts, _ = series_facts(session, study_id)
    catalog = load_catalog(settings.models_dir)
    selections = select_models(facts, rules)
    verdicts = explain(facts, rules)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "study_instance_uid": study_uid,
                    "series": [
                        {
                            **vars(s),
                            "sop_class_uids": sorted(s.sop_class_uids),
                            "image_type": list(s.image_type),
                            "calling_ae_titles": sorted(s.calling_ae_titles),
                        }
                        for s in facts
                    ],
                    "runs": [vars(s) for s in selections],
                    "verdicts": [{**vars(v), "models": list(v.models)} for v in verdicts],
                },
                indent=2,
            )
        )
    else:
        for s in facts:
            thickness = f"{s.slice_thickness:g} mm" if s.slice_thickness is not None else "-"
            typer.echo(
                f"series {s.series_instance_uid}: {s.modality or '-'}, "
                f"{s.num_instances} instances, {s.series_description or '(no description)'}, "
                f"ImageType {'/'.join(s.image_type) or '-'}, SliceThickness {thickness}, "
                f"sent by {', '.join(sorted(s.calling_ae_titles)) or '-'}"
            )
            for v in verdicts:
                if v.series_instance_uid != s.series_instance_uid:
                    continue
                if v.applies:
                    typer.echo(f"  rule {v.rule}: runs {', '.join(v.models)}")
                else:
                    typer.echo(f"  rule {v.rule}: no: {v.reason}")
            runs = [x for x in selections if x.series_instance_uid == s.series_instance_uid]
            for x in runs:
                missing = "" if x.model in catalog.models else "  (not in the model catalog!)"
                typer.echo(f"  => {x.model} (rule {x.rule}, priority {x.priority}){missing}")
            if not runs:
                typer.echo("  => no model")
        if not rules:
            typer.echo("no routing rules are configured ([[models.rules]])")
    raise typer.Exit(0 if selections else 1)
