"""The SDK's submit path against a real SQLite table and the in-memory dispatcher."""

import pytest

import llmos
from llmos import manager
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import UnknownModelError, UnsupportedTaskError, ValidationError
from llmos.jobs import JobStatus
from llmos.registry import ModelSpec, Registry
from llmos.sdk import Client

# these tests submit with no worker on purpose; the no-worker tests below expect the warning
pytestmark = pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")


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



@pytest.mark.parametrize("model,task,differ", [
    ("minilm", llmos.SentimentTask(text="bye"), "another input"),
    ("small", llmos.SentimentTask(text="hi"), "another model"),
    ("minilm", llmos.EmbeddingTask(texts=["hi"]), "another task and input"),
])
def test_idempotent_resubmit_of_another_job_is_refused(client, sqlite_settings, model, task, differ):
    a = client.load_model("minilm").submit(llmos.SentimentTask(text="hi"), idempotency_key="order-2")
    with pytest.raises(llmos.IdempotencyConflictError, match=f"'order-2' already names job {a.id} with {differ}"):
        client.load_model(model).submit(task, idempotency_key="order-2")
    assert count_rows(sqlite_settings) == 1 and [s[1] for s in client.sent] == [a.id]


def test_a_repeated_key_inside_one_call_must_name_one_job(client, sqlite_settings):
    with pytest.raises(llmos.IdempotencyConflictError, match="another input"):
        client.load_model("minilm").submit_many([llmos.SentimentTask(text="x"), llmos.SentimentTask(text="y")],
                                                idempotency_keys=["k", "k"])
    assert count_rows(sqlite_settings) == 0 and client.sent == []


def test_idempotent_dialogue_resubmit_returns_the_same_job(client, sqlite_settings):
    spec = ModelSpec(name="chat", source="x", kind="causal-lm", tasks=("dialogue",))
    client.registry = Registry({"chat": spec})
    chat = client.load_model("chat")
    a = chat.submit(llmos.DialogueTask(user_utterance="hello"), idempotency_key="turn-1")
    b = chat.submit(llmos.DialogueTask(user_utterance="hello"), idempotency_key="turn-1")
    other = chat.submit(llmos.DialogueTask(user_utterance="hello"), idempotency_key="turn-2")
    assert a.id == b.id != other.id and len(client.sent) == 2  # the conversation id comes from the key
    assert a.job().conversation_id != other.job().conversation_id


# Reads per wait, lost notices and the listener: tests/unit/test_notify_wait.py


def test_wait_timeout_returns_every_job_as_it_is(client):
    hs = client.load_model("small").submit_many([llmos.SentimentTask(text="a"), llmos.SentimentTask(text="b")])
    client.cancel(hs[0].id)
    jobs = client.wait([h.id for h in hs], timeout=0.2)
    assert jobs[hs[0].id].status == JobStatus.CANCELLED and jobs[hs[1].id].status == JobStatus.QUEUED


@pytest.mark.parametrize("timeout", [float("nan"), -1, "5", True])
def test_a_bad_wait_timeout_is_refused(client, timeout):
    h = client.load_model("small").submit(llmos.SentimentTask(text="hi"))
    with pytest.raises(ValidationError, match="timeout must be a number of seconds"):
        h.result(timeout=timeout)


@pytest.mark.parametrize("options,message", [
    (dict(idempotency_key=""), "idempotency_key must be a string of 1–256 characters, got 0 characters"),
    (dict(idempotency_key=5), "idempotency_key must be a string, or a list"),
    (dict(idempotency_key="k\x00"), "idempotency_key contains U\\+0000 at position 1"),
    (dict(tenant="t" * 200), "tenant must be a string of 1–128 characters, got 200 characters"),
    (dict(batch_id="b" * 65), "batch_id must be a string of 1–64 characters"),
    (dict(priority="²"), "unknown priority '²'"),
    (dict(deadline=1e12), "deadline must be .* at most 31622400"),
    (dict(deadline=float("inf")), "deadline must be"),
    (dict(timeout_s=float("nan")), "timeout_s must be a number of seconds over 0 and at most 3600"),
    (dict(timeout_s=3601), "at most 3600 \\(LLMOS_MAX_JOB_SECONDS\\)"),
    (dict(max_attempts=True), "max_attempts must be an integer 1–100"),
])
def test_bad_submit_options_say_what_and_the_limit(client, sqlite_settings, options, message):
    with pytest.raises(ValidationError, match=message):
        client.submit("small", [llmos.SentimentTask(text="hi")], **options)
    assert count_rows(sqlite_settings) == 0 and client.sent == []


def test_too_many_tasks_in_one_submit_are_refused(client, sqlite_settings):
    with pytest.raises(ValidationError, match="more than 10000 tasks in one submit"):
        client.load_model("small").submit_many(llmos.SentimentTask(text=f"{i}") for i in range(10_001))
    assert count_rows(sqlite_settings) == 0 and client.sent == []


def start_worker(settings, model, worker_id="w1"):
    """A live worker row for `model`, as a worker process writes at start."""
    manager.register_worker(get_engine(settings.db_url), worker_id=worker_id, host="h", pid=1,
                            model=model, device="cpu")


def test_submit_warns_once_per_call_when_no_worker_serves_the_model(client, sqlite_settings, monkeypatch, caplog):
    queries = []
    real = manager.live_workers
    monkeypatch.setattr(manager, "live_workers", lambda *a, **k: queries.append(a[1:]) or real(*a, **k))
    start_worker(sqlite_settings, "small")  # serves another model
    with pytest.warns(llmos.NoWorkerWarning) as caught, caplog.at_level("INFO", "llmos.sdk"):
        hs = client.load_model("minilm").submit_many([llmos.SentimentTask(text=f"t{i}") for i in range(50)])
    assert [str(w.message) for w in caught] == [
        "no live worker serves model 'minilm'; start one with `llmos worker --model minilm` "
        "(or `llmos up -m minilm`)"]
    assert queries == [("minilm",)]  # one query for the whole call
    assert "action=no_worker model=minilm jobs=50" in caplog.text
    assert {h.status() for h in hs} == {JobStatus.QUEUED} and len(client.sent) == 50


def test_submit_is_silent_when_a_live_worker_serves_the_model(client, sqlite_settings):
    import warnings

    start_worker(sqlite_settings, "small")
    with warnings.catch_warnings():
        warnings.simplefilter("error", llmos.NoWorkerWarning)
        client.load_model("small").submit(llmos.SentimentTask(text="hi"))


def test_a_stopped_or_silent_worker_does_not_count(client, sqlite_settings):
    import sqlalchemy as sa

    from llmos.db import workers

    engine = get_engine(sqlite_settings.db_url)
    start_worker(sqlite_settings, "small", "stopped")
    manager.stop_worker(engine, "stopped")
    start_worker(sqlite_settings, "small", "silent")
    with engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == "silent")
                     .values(last_heartbeat=sa.func.datetime("now", "-1 hour")))
    with pytest.warns(llmos.NoWorkerWarning, match="no live worker serves model 'small'"):
        client.load_model("small").submit(llmos.SentimentTask(text="hi"))


def test_execute_fails_fast_when_no_worker_serves_the_model(sqlite_settings):
    settings = sqlite_settings.model_copy(update={"no_worker_grace_s": 0.3})
    c = Client(settings, dispatcher=InMemoryDispatcher())
    with pytest.raises(llmos.NoWorkerError) as failed:
        c.load_model("minilm").execute(llmos.SentimentTask(text="hi"), timeout=300)
    (job,) = [manager.get_job(c.engine, row_id, tenant=manager.ANY_TENANT) for row_id in all_ids(settings)]
    assert str(failed.value) == (
        "no live worker serves model 'minilm'; start one with `llmos worker --model minilm` "
        f"(or `llmos up -m minilm`): job {job.id} is still queued after 0.3 s and stays queued until one starts")
    assert job.status == JobStatus.QUEUED  # the job is kept


def test_execute_keeps_waiting_when_a_worker_appeared_within_the_grace(sqlite_settings, monkeypatch):
    settings = sqlite_settings.model_copy(update={"no_worker_grace_s": 0.2})
    c = Client(settings, dispatcher=InMemoryDispatcher())
    engine = get_engine(settings.db_url)
    checks = []
    real = manager.live_workers

    def live_workers(*args, **kwargs):
        checks.append(args[1])
        if len(checks) == 2:  # after the grace: a worker started meanwhile, and runs the job
            (job_id,) = all_ids(settings)
            start_worker(settings, "minilm")
            claimed, _ = manager.claim(engine, [job_id], worker_id="w1", device="cpu")
            manager.finish(engine, [manager.Outcome(job_id=job_id, worker_id="w1", attempt=claimed[0].attempts,
                                                    result={"label": "POSITIVE", "score": 0.9})])
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "live_workers", live_workers)
    result = c.load_model("minilm").execute(llmos.SentimentTask(text="hi"), timeout=30)
    assert result.label == "POSITIVE" and checks == ["minilm", "minilm"]


def all_ids(settings):
    import sqlalchemy as sa

    with get_engine(settings.db_url).connect() as c:
        return [str(r[0]) for r in c.execute(sa.select(jobs.c.id))]
