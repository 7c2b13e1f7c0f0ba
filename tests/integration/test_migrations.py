"""`alembic upgrade head`, `alembic check`, `alembic downgrade base`, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.helpers import REPO, create_pg_database, drop_pg_database, require_postgres, service_env

pytestmark = pytest.mark.integration

ALEMBIC = str(Path(sys.executable).parent / "alembic")


def alembic(url, *args):
    return subprocess.run([ALEMBIC, *args], cwd=REPO, env=service_env(LLMOS_DATABASE_URL=url),
                          capture_output=True, text=True, timeout=120)


def tables(url):
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def empty_pg():
    try:
        require_postgres()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    url = create_pg_database("llmos_mig")
    yield url
    drop_pg_database(url)


def check_cycle(url):
    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert {"jobs", "workers", "alembic_version"} <= tables(url)
    check = alembic(url, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    down = alembic(url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert tables(url) <= {"alembic_version"}


def test_postgres_upgrade_check_downgrade(empty_pg):
    check_cycle(empty_pg)


def test_sqlite_upgrade_check_downgrade(tmp_path):
    check_cycle(f"sqlite:///{tmp_path / 'm.db'}")


def test_llmos_db_upgrade_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = subprocess.run([sys.executable, "-m", "llmos.cli", "db", "upgrade"], cwd=tmp_path,
                         env=service_env(LLMOS_DATABASE_URL=url), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "at head" in run.stdout and "jobs" in tables(url)
