"""Alembic environment: the URL comes from the caller (`llmos db upgrade`) or LLMOS settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from llmos.db import metadata
from llmos.settings import get_settings

config = context.config
# `llmos db upgrade` passes the URL in attributes; the plain `alembic` command reads LLMOS settings
# (LLMOS_DATABASE_URL, else the embedded SQLite file). No alembic.ini is needed: pyproject.toml
# carries script_location.
url = config.attributes.get("sqlalchemy.url") or get_settings().db_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"), compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=url.startswith("sqlite"), compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
