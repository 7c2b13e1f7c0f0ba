"""Bulk submit on Postgres: create_jobs writes its rows with one binary COPY (issue 11).

The rows it writes are compared column by column with the ones SQLAlchemy's executemany (the
path SQLite keeps) writes for the same jobs; idempotency keys, the race retry, refusals and
webhook deliveries keep their behaviour.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs, webhook_deliveries
from llmos.errors import IdempotencyConflictError
from llmos.jobs import Job, JobStatus, new_ids

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(pg_url):
    return get_engine(pg_url)


@pytest.fixture
def tenant():
    return f"bulk-{uuid.uuid4().hex[:10]}"  # each test's own rows


def varied(n: int, tenant: str, *, key_prefix: str | None = "k") -> list[manager.NewJob]:
    """`n` jobs using every column a submit sets, with inputs JSON finds hard (unicode, NUL, nesting)."""
    at = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    texts = ["plain", "ünïcödé 😀 \u2028", "nul \x00 and lone \ud83d", 'quotes " \\ \t\n', ""]
    out = []
    for i in range(n):
        out.append(manager.NewJob(
            model="minilm" if i % 4 else "gpt2", task_type="sentiment" if i % 4 else "writing",
            input={"text": texts[i % len(texts)], "n": i, "f": i / 7, "nested": {"a": [1, None, True]}}
            if i % 2 else {"text": f"t{i}"},
            priority=i % 10, tenant=tenant if i % 3 else f"{tenant}-b",
            idempotency_key=None if key_prefix is None or i % 2 else f"{key_prefix}{i}",
            batch_id=None if i % 5 == 0 else f"batch-{i % 3}", conversation_id=f"c{i}" if i % 7 == 0 else None,
            max_attempts=1 + i % 3, timeout_s=None if i % 6 else (2.5 if i % 12 else 30),
            deadline=at if i % 8 == 1 else None, deadline_in_s=3600.0 if i % 8 == 2 else None,
            eta_start_in_s=None if i % 9 == 0 else i / 3, eta_finish_in_s=None if i % 9 == 0 else i / 3 + 0.25))
    return out


def raw_rows(engine, ids) -> dict[str, dict]:
    """Every column of the rows (ids as str), and the jsonb's text as the server keeps it."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(jobs, sa.cast(jobs.c.input, sa.Text).label("input_text"))
                            .where(jobs.c.id.in_(list(ids)))).mappings().all()
    return {str(r["id"]): dict(r) for r in rows}


def test_new_ids_are_random_uuid4_strings():
    ids = new_ids(20_000)
    assert len(set(ids)) == len(ids) and new_ids(0) == []
    for i in ids:
        u = uuid.UUID(i)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == i


def test_job_from_fields_equals_the_dataclass_built_one():
    fields = dict(id=str(uuid.uuid4()), model="m", task_type="sentiment", priority=3, status=JobStatus.QUEUED,
                  input={"text": "x"}, tenant="t", batch_id="b", created_at=datetime.now(timezone.utc))
    fast = Job.from_fields(fields)
    assert fast == Job(**fields) and fast.evolve(priority=4) == Job(**{**fields, "priority": 4})
    with pytest.raises(Exception):
        fast.priority = 1  # still frozen


def test_copy_writes_the_rows_executemany_writes(engine, tenant):
    """5,000 jobs written by COPY, then the same jobs by executemany: every column identical."""
    new = varied(5000, tenant)
    with engine.begin() as conn:
        now = manager.db_now(conn)
    _, created = manager._new_jobs(new, {}, now)
    ids = [j.id for j in created]
    with engine.begin() as conn:
        manager._copy_jobs(conn, created)
    by_copy = raw_rows(engine, ids)
    with engine.begin() as conn:
        conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))
        conn.execute(jobs.insert(), [manager._job_row(j) for j in created])
    by_executemany = raw_rows(engine, ids)
    assert len(by_copy) == 5000 and by_copy == by_executemany
    nul = next(r for r in by_copy.values() if r["input"]["text"].startswith("nul "))
    assert nul["input"]["text"] == "nul \ufffd and lone \ufffd"  # dump_json's replacements, as before
    # and the jobs create_jobs hands back are the rows as read back (an input's NUL is stored replaced)
    got = manager.get_jobs(engine, ids, tenant=manager.ANY_TENANT)
    assert [got[j.id].evolve(input=None) for j in created] == [j.evolve(input=None) for j in created]
    assert all(got[j.id].input == j.input for j in created if "nul" not in j.input["text"])


def test_create_jobs_returns_the_rows_it_writes(engine, tenant):
    new = varied(2000, tenant)
    out = manager.create_jobs(engine, new)
    assert [c for _, c in out] == [True] * 2000
    got = manager.get_jobs(engine, [j.id for j, _ in out], tenant=manager.ANY_TENANT)
    assert [got[j.id] for j, _ in out if "nul" not in j.input["text"]] \
        == [j for j, _ in out if "nul" not in j.input["text"]]
    first = out[0][0]
    assert first.status == JobStatus.QUEUED and first.created_at == first.queued_at == first.dispatched_at
    assert out[2][0].deadline == first.created_at + timedelta(seconds=3600)  # deadline_in_s: the db's clock
    assert out[1][0].deadline == datetime(2031, 5, 6, 5, 8, 9, 123456, tzinfo=timezone.utc)


def test_a_keyed_submit_retried_returns_the_same_jobs(engine, tenant):
    new = varied(3000, tenant)
    first = manager.create_jobs(engine, new)
    again = manager.create_jobs(engine, new)
    keyed = [i for i, n in enumerate(new) if n.idempotency_key is not None]
    assert keyed and all(not again[i][1] and again[i][0] == first[i][0] for i in keyed)
    assert all(again[i][1] for i in range(len(new)) if i not in set(keyed))  # unkeyed: new jobs
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.tenant.in_([tenant, f"{tenant}-b"]))).scalar_one()
    assert n == len(new) + len(new) - len(keyed)


def test_a_key_taken_meanwhile_is_retried_once(engine, tenant, monkeypatch):
    """A concurrent submit wrote the key after the lookup: the COPY's unique violation -> one retry."""
    other = manager.create_jobs(engine, varied(10, tenant))
    real, calls = manager._find_by_keys, []

    def late(bind, keys):
        calls.append(len(keys))
        return {} if len(calls) == 1 else real(bind, keys)  # the first lookup misses the other's rows

    monkeypatch.setattr(manager, "_find_by_keys", late)
    new = varied(10, tenant) + varied(5, tenant, key_prefix="fresh")
    out = manager.create_jobs(engine, new, webhook_url="https://hooks.example.com/h")
    assert len(calls) == 2
    assert [j for j, _ in out[:10:2]] == [j for j, _ in other[:10:2]] and not any(c for _, c in out[:10:2])
    assert all(c for _, c in out[10:])
    with engine.connect() as conn:  # the first try's rows and deliveries were rolled back
        ids = [str(r[0]) for r in conn.execute(sa.select(jobs.c.id).where(
            jobs.c.tenant.in_([tenant, f"{tenant}-b"])))]
        hooks = conn.execute(sa.select(sa.func.count()).select_from(webhook_deliveries).where(
            webhook_deliveries.c.tenant.in_([tenant, f"{tenant}-b"]))).scalar_one()
    assert sorted(ids) == sorted({j.id for j, _ in other} | {j.id for j, _ in out})
    created = [j for j, c in out if c]
    assert hooks == len({(j.tenant, j.batch_id) for j in created if j.batch_id}) \
        + sum(1 for j in created if j.batch_id is None)

    monkeypatch.setattr(manager, "_find_by_keys", lambda bind, keys: {})  # the key is always "new"
    with pytest.raises(sa.exc.IntegrityError):  # retried once only, then the violation stands
        manager.create_jobs(engine, varied(2, tenant))


def test_a_conflicting_key_writes_nothing(engine, tenant):
    manager.create_jobs(engine, varied(4, tenant))
    new = varied(4, tenant, key_prefix="other") + [
        manager.NewJob(model="gpt2", task_type="writing", input={"text": "changed"}, priority=5,
                       tenant=f"{tenant}-b", idempotency_key="k0")]
    with pytest.raises(IdempotencyConflictError, match="another input"):
        manager.create_jobs(engine, new, webhook_url="https://hooks.example.com/h")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.idempotency_key.like("other%"), jobs.c.tenant.in_([tenant, f"{tenant}-b"]))).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(webhook_deliveries).where(
            webhook_deliveries.c.tenant.in_([tenant, f"{tenant}-b"]))).scalar_one() == 0


def test_a_key_repeated_in_one_call_is_one_job(engine, tenant):
    same = manager.NewJob(model="minilm", task_type="sentiment", input={"text": "x"}, priority=5, tenant=tenant,
                          idempotency_key="dup")
    plain = manager.NewJob(model="minilm", task_type="sentiment", input={"text": "y"}, priority=5, tenant=tenant)
    out = manager.create_jobs(engine, [same, plain, same, same])
    assert [c for _, c in out] == [True, True, False, False]
    assert out[0][0] == out[2][0] == out[3][0] and out[1][0].id != out[0][0].id
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.tenant == tenant)).scalar_one() == 2
    other = manager.NewJob(model="minilm", task_type="sentiment", input={"text": "z"}, priority=5, tenant=tenant,
                           idempotency_key="d2")
    with pytest.raises(IdempotencyConflictError):  # the repeat asks for another input: nothing written
        manager.create_jobs(engine, [plain, other, dataclasses.replace(other, input={"text": "w"})])
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.tenant == tenant)).scalar_one() == 2


def test_deliveries_are_written_with_the_copied_jobs(engine, tenant):
    url = "https://hooks.example.com/h"
    batched = [manager.NewJob(model="minilm", task_type="sentiment", input={"text": str(i)}, priority=5,
                              tenant=tenant, batch_id="b1") for i in range(3000)]
    single = [manager.NewJob(model="minilm", task_type="sentiment", input={"text": str(i)}, priority=5,
                             tenant=tenant) for i in range(3)]
    out = manager.create_jobs(engine, batched + single, webhook_url=url)
    manager.create_jobs(engine, batched[:10], webhook_url=url)  # another part of the pending batch: no second
    got = manager.list_deliveries(engine, tenant=tenant, limit=1000)
    assert sorted((d.kind, d.target_id) for d in got) == sorted(
        [("batch", "b1")] + [("job", j.id) for j, _ in out[3000:]])
    assert all(d.created_at == out[0][0].created_at and d.url == url for d in got)
    assert len({d.id for d in got}) == 4 and all(uuid.UUID(d.id).version == 4 for d in got)
    bad = manager.NewJob(model="minilm", task_type="sentiment", input={}, priority=99, tenant=tenant)
    with pytest.raises(sa.exc.IntegrityError):  # the table refuses it: one transaction, nothing written
        manager.create_jobs(engine, single + [bad], webhook_url=url)
    assert len(manager.list_deliveries(engine, tenant=tenant, limit=1000)) == 4


def test_copy_refusals_raise_as_sqlalchemy_does(engine, tenant):
    long_model = manager.NewJob(model="m" * 129, task_type="sentiment", input={}, priority=5, tenant=tenant)
    with pytest.raises(sa.exc.DataError):  # varchar(128), as an INSERT refuses it
        manager.create_jobs(engine, [long_model])
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.tenant == tenant)).scalar_one() == 0
    (job, created), = manager.create_jobs(engine, [  # and the connection went back to the pool usable
        manager.NewJob(model="minilm", task_type="sentiment", input={}, priority=5, tenant=tenant)])
    assert created and manager.get_job(engine, job.id, tenant=tenant) == job


def test_sqlite_keeps_executemany_and_the_same_jobs(sqlite_settings, tenant):
    engine = get_engine(sqlite_settings.db_url)
    new = varied(500, tenant)
    out = manager.create_jobs(engine, new, webhook_url="https://hooks.example.com/h")
    got = manager.get_jobs(engine, [j.id for j, _ in out], tenant=manager.ANY_TENANT)
    assert len(got) == 500
    for job, _ in out:
        stored = got[job.id]
        if "nul" in job.input["text"]:
            continue  # stored replaced, as on Postgres
        naive = dict(created_at=None, queued_at=None, dispatched_at=None, deadline=None, eta_start_at=None,
                     eta_finish_at=None)  # SQLite hands timestamps back naive
        assert stored.evolve(**naive) == job.evolve(**naive)
        assert manager.as_utc(stored.created_at) == job.created_at
        assert (manager.as_utc(stored.eta_start_at), manager.as_utc(stored.eta_finish_at)) \
            == (job.eta_start_at, job.eta_finish_at)
    again = manager.create_jobs(engine, new)
    assert all(not c for (_, c), n in zip(again, new) if n.idempotency_key is not None)
