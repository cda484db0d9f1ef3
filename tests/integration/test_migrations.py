"""The same Alembic migrations upgrade and downgrade on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from pacs_agent.db.migrate import current_revision, downgrade, head_revision, upgrade
from pacs_agent.db.models import Base
from pacs_agent.db.session import make_engine

pytestmark = pytest.mark.integration

TABLES = {"studies", "series", "instances", "jobs", "findings", "exports", "alembic_version"}


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision(url)
        insp = inspect(engine)
        assert set(insp.get_table_names()) >= TABLES
        # The migrated schema has every column the models declare.
        for table in Base.metadata.sorted_tables:
            migrated = {c["name"] for c in insp.get_columns(table.name)}
            assert {c.name for c in table.columns} <= migrated, table.name
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
        upgrade(url)  # and up again
        assert current_revision(engine) == head_revision(url)
    finally:
        engine.dispose()


def test_migrations_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'agent.db'}")


def test_migrations_upgrade_and_downgrade_on_postgresql(postgres_url: str) -> None:
    _roundtrip(postgres_url)
