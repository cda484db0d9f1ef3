"""Shared pieces of the CLI modules: settings, logging, database sessions."""

from __future__ import annotations

import logging
from typing import Any

import typer
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import ConfigError, Settings, load_settings


def settings_from(ctx: typer.Context) -> Settings:
    """The settings of this invocation, read once (exit 2 with the reason when invalid)."""
    root = ctx.find_root()
    obj: dict[str, Any] = root.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config"))
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    settings: Settings = obj["settings"]
    return settings


def config_file_from(ctx: typer.Context) -> Any:
    return ctx.find_root().ensure_object(dict).get("config")


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, settings.logging.level_no))


def session_factory(settings: Settings) -> sessionmaker[Session]:
    from pacs_agent.db.session import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database_url))
