"""The SDK's submit path against a real SQLite table and the in-memory dispatcher."""

import pytest

import llmos
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import UnknownModelError, UnsupportedTaskError, ValidationError
from llmos.jobs import JobStatus
from llmos.registry import ModelSpec, Registry
from llmos.sdk import Client


def count_rows(settings):
    import sqlalchemy as sa

    with get_engine(settings.db_url).connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(jobs)).scalar()


@pytest.fixture
def client(sqlite_settings):
    spec = ModelSpec(name="small", source="x", tasks=("sentiment",), max_input_chars=50)
    registry = Registry({"small": spec, "minilm": Registry.load(sqlite_settings).get("minilm")})
    dispatcher = InMemoryDispatcher()
    c = Client(sqlite_settings, dispatcher=dispatcher, registry=registry)
    c.sent = dispatcher.sent
    return c


def test_submit_writes_then_sends_job_id_at_broker_priority(client, sqlite_settings):
    model = client.load_model("small")
    h = model.submit(llmos.SentimentTask(text="hi"), priority="critical")
    assert client.sent == [("llmos.small", h.id, 0)]
    job = h.job()
    assert job.status == JobStatus.QUEUED and job.input == {"text": "hi"} and job.priority == 9
    assert h.status() == JobStatus.QUEUED


def test_submit_many_sends_each_once(client):
    hs = client.load_model("minilm").submit_many(
        [llmos.SentimentTask(text=f"t{i}") for i in range(5)], priority=3)
    assert [s[1] for s in client.sent] == [h.id for h in hs]
    assert {s[2] for s in client.sent} == {6}


def test_idempotent_resubmit_sends_nothing_new(client):
    model = client.load_model("small")
    a = model.submit(llmos.SentimentTask(text="hi"), idempotency_key="order-1")
    b = model.submit(llmos.SentimentTask(text="hi"), idempotency_key="order-1")
    assert a.id == b.id and len(client.sent) == 1


@pytest.mark.parametrize("make,error,match", [
    (lambda c: c.load_model("nope"), UnknownModelError, "known models: minilm, small"),
    (lambda c: c.load_model("minilm").submit(llmos.EmbeddingTask(texts=["a"])) and
     c.load_model("small").submit(llmos.EmbeddingTask(texts=["a"])), UnsupportedTaskError,
     "it runs: sentiment"),
    (lambda c: c.load_model("small").submit(llmos.SentimentTask(text="x" * 51)), ValidationError,
     "51 characters is over model 'small'"),
    (lambda c: c.load_model("small").submit("just a string"), ValidationError, "expected a task"),
    (lambda c: c.load_model("small").submit(llmos.SentimentTask(text="x"), priority=11), ValidationError,
     "priority"),
])
def test_bad_input_writes_and_sends_nothing(client, sqlite_settings, make, error, match):
    before, sent_before = count_rows(sqlite_settings), len(client.sent)
    with pytest.raises(error, match=match):
        make(client)
    # the one valid minilm embed in the unsupported-task case was written; nothing else
    extra = 1 if error is UnsupportedTaskError else 0
    assert count_rows(sqlite_settings) == before + extra
    assert len(client.sent) == sent_before + extra


def test_one_bad_task_in_submit_many_writes_nothing(client, sqlite_settings):
    tasks = [llmos.SentimentTask(text="ok")] * 3 + [llmos.SentimentTask(text="x" * 60)]
    with pytest.raises(ValidationError):
        client.load_model("small").submit_many(tasks)
    assert count_rows(sqlite_settings) == 0 and client.sent == []


def test_cancel_queued_job(client):
    h = client.load_model("small").submit(llmos.SentimentTask(text="hi"))
    assert h.cancel() is True
    assert h.status() == JobStatus.CANCELLED
    with pytest.raises(llmos.JobFailedError, match="cancelled"):
        h.result(timeout=1)


def test_result_timeout_while_queued(client):
    h = client.load_model("small").submit(llmos.SentimentTask(text="hi"))
    with pytest.raises(llmos.JobTimeoutError, match="still queued"):
        h.result(timeout=0.3)


def test_unknown_job_id(client):
    with pytest.raises(llmos.JobNotFoundError):
        client.job("00000000-0000-0000-0000-000000000000")


def test_deadline_in_another_timezone_is_stored_as_the_same_instant(client):
    from datetime import datetime, timedelta, timezone

    eastern = timezone(timedelta(hours=-5))
    deadline = datetime.now(eastern) + timedelta(minutes=30)
    h = client.load_model("small").submit(llmos.SentimentTask(text="hi"), deadline=deadline)
    stored = h.job().deadline
    stored = stored if stored.tzinfo else stored.replace(tzinfo=timezone.utc)
    assert abs((stored - deadline).total_seconds()) < 1
    from llmos import manager

    assert manager.expire_overdue(client.engine) == []  # 30 minutes ahead is not overdue


def test_bad_deadline_and_timeout_are_refused(client):
    from datetime import datetime

    m = client.load_model("small")
    with pytest.raises(ValidationError, match="timezone-aware"):
        m.submit(llmos.SentimentTask(text="hi"), deadline=datetime.now())
    with pytest.raises(ValidationError, match="timeout_s"):
        m.submit(llmos.SentimentTask(text="hi"), timeout_s=-1)
