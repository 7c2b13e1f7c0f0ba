"""Schema migrations from code: `llmos db upgrade` and `llmos up` call these (Alembic underneath)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from llmos.db import DatabaseUnavailableError, first_line
from llmos.files import private_dir, secure_sqlite
from llmos.settings import redact


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["sqlalchemy.url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (creates the SQLite file's folder if needed)."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        if not folder.exists():
            private_dir(folder)
    import sqlalchemy as sa

    try:
        command.upgrade(alembic_config(url), revision)
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach the database at {redact(url)}: {first_line(exc.orig or exc)}"
        ) from None
    secure_sqlite(url)  # every job's input and result: the user's alone


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
