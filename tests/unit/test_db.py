"""llmos.db on SQLite: a transaction that reads before it writes takes the write lock at BEGIN."""

import threading
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from llmos import migrate
from llmos.db import begin_write, get_engine, workers


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    return get_engine(url)


def _row(i: int) -> dict:
    now = datetime.now(timezone.utc)
    return dict(id=f"w{i}", host="h", pid=i, model="m", device="cpu", started_at=now, last_heartbeat=now)


@pytest.mark.parametrize("immediate", [True, False])
def test_a_read_then_write_transaction_survives_a_writer_in_between(engine, immediate):
    """The other writer commits between this transaction's read and its write. With begin_write it
    waits for the lock and both commit; a deferred transaction gets "database is locked" at once."""
    other_done = threading.Event()

    def other_writer():
        with engine.begin() as conn:
            conn.execute(workers.insert().values(**_row(2)))
        other_done.set()

    opened = begin_write(engine) if immediate else engine.begin()
    try:
        with opened as conn:
            conn.execute(sa.select(sa.func.count()).select_from(workers)).scalar_one()
            t = threading.Thread(target=other_writer)
            t.start()
            other_done.wait(2.0 if immediate else 30.0)  # immediate: it waits on our lock
            conn.execute(workers.insert().values(**_row(1)))
    except sa.exc.OperationalError as exc:
        assert not immediate, exc
        assert "database is locked" in str(exc)
        t.join()
        return
    t.join()
    assert immediate, "a deferred read-then-write transaction was expected to fail here"
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(workers)).scalar_one() == 2
