"""Fixtures for every layer. Integration fixtures fail (never skip) when Redis or Postgres is missing."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _key in [k for k in os.environ if k.startswith("LLMOS_") and not k.startswith("LLMOS_TEST_")]:
    del os.environ[_key]  # a developer's own LLMOS settings must not leak into tests

import pytest  # noqa: E402
import redis  # noqa: E402

from llmos import migrate  # noqa: E402
from llmos.db import dispose_engines, get_engine, jobs, workers  # noqa: E402
from llmos.settings import Settings  # noqa: E402
from tests import helpers  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own LLMOS_HOME and no llmos.toml from the working directory."""
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    yield home


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    s = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'unit.db'}",
                 redis_url="redis://127.0.0.1:1/0")
    migrate.upgrade(s.db_url)
    return s


@pytest.fixture(scope="session")
def pg_url():
    try:
        helpers.require_postgres()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    given = os.environ.get("LLMOS_TEST_DATABASE_URL")  # .ci/run makes a fresh one per run
    url = given or helpers.create_pg_database()
    migrate.upgrade(url)
    yield url
    if not given:
        helpers.drop_pg_database(url)


@pytest.fixture(scope="session")
def redis_url():
    try:
        helpers.require_redis()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return helpers.REDIS_URL


def reset_services(pg_url: str, redis_url: str) -> None:
    """Empty task table, workers table and Redis database (no worker may be running)."""
    with get_engine(pg_url).begin() as conn:
        conn.execute(jobs.delete())
        conn.execute(workers.delete())
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="module")
def services(pg_url, redis_url, tmp_path_factory):
    """Postgres + Redis emptied for this module, and an env for worker processes."""
    reset_services(pg_url, redis_url)
    home = tmp_path_factory.mktemp("svc-home")
    env = helpers.service_env(LLMOS_DATABASE_URL=pg_url, LLMOS_REDIS_URL=redis_url,
                              LLMOS_HOME=str(home))
    settings = Settings(home=home, database_url=pg_url, redis_url=redis_url)
    return settings, env


@pytest.fixture(scope="module")
def pg_worker(services):
    """One real minilm worker process on Postgres + Redis for the module."""
    settings, env = services
    worker = helpers.WorkerProcess(env).wait_ready(settings.db_url)
    yield worker
    assert worker.stop() == 0, worker.log()


@pytest.fixture(scope="session", autouse=True)
def _dispose_engines():
    yield
    dispose_engines()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Tiny GPT-2, BART, DistilBERT classifier and QA models saved to folders (built once)."""
    from tests.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_config(tiny_folders, tmp_path_factory):
    """An llmos.toml registering the tiny models (no openai entry)."""
    from tests.tiny_models import write_config

    return write_config(tmp_path_factory.mktemp("cfg") / "llmos.toml", tiny_folders)


@pytest.fixture(scope="session")
def tiny_registry(tiny_config, tmp_path_factory):
    from llmos.registry import Registry

    return Registry.load(Settings(home=tmp_path_factory.mktemp("reg-home"), config=tiny_config))


def start_openai_server(model_dir, *args):
    """Start tests/openai_server.py; returns (process, base URL)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_server", "--model", str(model_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=helpers.REPO,
                            env=helpers.service_env())
    seen = ""
    line = proc.stdout.readline()
    while line and not line.startswith("READY"):
        seen += line
        line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.stdout.close()
        raise RuntimeError(f"openai test server did not start:\n{seen}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def stop_openai_server(proc):
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture(scope="session")
def openai_server(tiny_folders):
    """A real OpenAI-compatible server on loopback over the tiny GPT-2 (needs a key; 429s twice)."""
    key = "test-key-123"
    proc, url = start_openai_server(tiny_folders["gpt2"], "--api-key", key, "--fail-first", "2")
    yield url, key
    stop_openai_server(proc)


def pytest_terminal_summary(terminalreporter):
    """Print the reliability table when fault tests ran (docs/reliability.md keeps the latest)."""
    import sys

    module = sys.modules.get("tests.integration.test_faults")
    rows = getattr(module, "REPORT", None)
    if not rows:
        return
    cols = list(rows[0])
    terminalreporter.write_sep("=", "reliability (fault tests)")
    terminalreporter.write_line("| " + " | ".join(cols) + " |")
    terminalreporter.write_line("|" + "---|" * len(cols))
    for r in rows:
        terminalreporter.write_line("| " + " | ".join(str(r[c]) for c in cols) + " |")
