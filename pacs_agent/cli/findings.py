"""``pacs-agent findings STUDY_UID [--json]``: what the models found in a study.

Exit codes: 0 findings listed; 3 the study has none (unknown study, or no job has finished).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pacs_agent.cli.common import session_factory, settings_from

EXIT_NOTHING = 3


def register(app: typer.Typer) -> None:
    app.command("findings")(findings)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def findings(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the findings of every job of a study: label, code, volume, connected components
    and the largest one's volume, probability, flag, and the SEG and SR SOP Instance UIDs."""
    from pacs_agent.findings import findings_of_study

    settings = settings_from(ctx)
    with session_factory(settings)() as session:
        found = findings_of_study(session, study_uid)
    if as_json:
        typer.echo(json.dumps([f.as_json() for f in found], indent=2))
    else:
        for f in found:
            typer.echo(
                f"job {f.job_id} {f.model_name} {f.model_version or '?'} [{f.job_status}] "
                f"{f.kind} {f.number} {f.label} ({f.code_scheme} {f.code_value} "
                f'"{f.code_meaning}") flag={"yes" if f.flag else "no"} '
                f"volume_mm3={_number(f.volume_mm3, 1)} mean_hu={_number(f.mean_hu, 1)} "
                f"components={'-' if f.component_count is None else f.component_count} "
                f"largest_mm3={_number(f.largest_component_mm3, 1)} "
                f"probability={_number(f.probability, 3)} "
                f"seg={f.seg_sop_instance_uid or '-'} sr={f.sr_sop_instance_uid or '-'}"
            )
    if not found:
        if not as_json:
            typer.echo(f"no findings for study {study_uid}", err=True)
        raise typer.Exit(EXIT_NOTHING)
