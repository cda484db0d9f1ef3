"""Alembic environment: the database URL comes from the pacs-agent settings.

``pacs-agent db upgrade`` passes the URL in ``config.attributes["url"]``; the plain ``alembic``
command reads the settings (``PACS_AGENT_CONFIG`` / ``PACS_AGENT_DATABASE__URL``).
"""

from __future__ import annotations

from alembic import context

from pacs_agent.config import load_settings
from pacs_agent.db.models import Base
from pacs_agent.db.session import make_engine

config = context.config
url: str = config.attributes.get("url") or load_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
