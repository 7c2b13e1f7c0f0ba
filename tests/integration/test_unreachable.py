"""Redis or the database unreachable: an error that says which and where, and nothing written."""

import pytest
import sqlalchemy as sa

import llmos
from llmos.db import get_engine, jobs
from llmos.settings import Settings

pytestmark = pytest.mark.integration


def count_jobs(url):
    with get_engine(url).connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(jobs)).scalar()


def test_redis_unreachable_names_redis_and_writes_nothing(services, tmp_path):
    settings, _ = services
    bad = Settings(home=tmp_path, database_url=settings.db_url, redis_url="redis://127.0.0.1:1/0")
    before = count_jobs(settings.db_url)
    with llmos.Client(bad) as client:
        with pytest.raises(llmos.BrokerUnavailableError) as info:
            client.load_model("minilm").submit(llmos.SentimentTask(text="hello"))
    msg = str(info.value)
    assert msg.startswith("cannot reach Redis at redis://127.0.0.1:1/0") and "LLMOS_REDIS_URL" in msg
    assert "kombu" not in msg and "Traceback" not in msg
    assert count_jobs(settings.db_url) == before


def test_database_unreachable_names_the_database(services, tmp_path):
    settings, _ = services
    bad = Settings(home=tmp_path, database_url="postgresql://llmos:secret@127.0.0.1:1/llmos",
                   redis_url=settings.redis_url)
    with llmos.Client(bad) as client:
        with pytest.raises(llmos.DatabaseUnavailableError) as info:
            client.load_model("minilm").submit(llmos.SentimentTask(text="hello"))
    msg = str(info.value)
    assert msg.startswith("cannot reach the database at postgresql+psycopg://llmos:***@127.0.0.1:1/llmos")
    assert "secret" not in msg


def test_database_without_schema_says_to_upgrade(services, tmp_path):
    settings, _ = services
    empty = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.db'}",
                     redis_url=settings.redis_url)
    with llmos.Client(empty) as client:
        with pytest.raises(llmos.DatabaseUnavailableError, match="llmos db upgrade"):
            client.load_model("minilm").submit(llmos.SentimentTask(text="hello"))


def test_embedded_stack_not_running_says_how_to_start_it(tmp_path):
    with llmos.Client(Settings(home=tmp_path)) as client:
        with pytest.raises(llmos.BrokerUnavailableError, match="start it with `llmos up`"):
            client.load_model("minilm").submit(llmos.SentimentTask(text="hello"))
