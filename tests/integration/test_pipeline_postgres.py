"""Jobs through a real worker process on real Redis and Postgres."""

import pytest
import sqlalchemy as sa

import llmos
from llmos import manager
from llmos.db import get_engine, jobs
from llmos.dispatch import CeleryDispatcher
from llmos.jobs import JobStatus
from llmos.sdk import Client

pytestmark = pytest.mark.integration


@pytest.fixture
def client(services, pg_worker):
    settings, _ = services
    with Client(settings) as c:
        yield c


def test_200_jobs_at_mixed_priorities_all_succeed_with_timings(client, pg_worker):
    model = client.load_model("minilm")
    handles = []
    for p in range(10):  # 10 priorities × 20 jobs, sentiment and embed mixed
        tasks = [llmos.SentimentTask(text=f"review {p}-{i}: I really loved this, great value")
                 if i % 2 else llmos.EmbeddingTask(texts=[f"document {p}-{i}", "second text"])
                 for i in range(20)]
        handles += model.submit_many(tasks, priority=p)
    assert len(handles) == 200
    jobs_by_id = client.wait([h.id for h in handles], timeout=300)
    assert len(jobs_by_id) == 200
    statuses = {j.status for j in jobs_by_id.values()}
    assert statuses == {JobStatus.SUCCEEDED}, [j.error for j in jobs_by_id.values() if j.error][:3]
    for job in jobs_by_id.values():
        assert job.queue_wait_ms is not None and job.queue_wait_ms >= 0
        assert job.compute_ms is not None and job.compute_ms > 0
        assert job.batch_size is not None and job.batch_size >= 1
        assert job.tokens_in and job.tokens_in > 0
        assert job.started_at and job.finished_at and job.finished_at >= job.started_at
        assert job.worker_id.startswith("minilm@") and job.device == "cpu" and job.attempts == 1
    assert max(j.batch_size for j in jobs_by_id.values()) > 1  # the worker batched
    assert {j.priority for j in jobs_by_id.values()} == set(range(10))
    for h in handles:
        res = llmos.sdk.result_of(jobs_by_id[h.id])
        if h.task_type == "sentiment":
            assert res.label == "POSITIVE" and 0.5 <= res.score <= 1.0
        else:
            assert res.dim == 384 and len(res.vectors) == 2
            assert abs(sum(x * x for x in res.vectors[0]) - 1.0) < 1e-4  # normalised


def test_seed_style_execute(client):
    model = llmos.load_model("minilm", client=client)
    good = model.execute(llmos.SentimentTask(text="Absolutely wonderful, I love it!"), timeout=60)
    bad = model.execute(llmos.SentimentTask(text="Terrible. It broke in a day and I want a refund."), timeout=60)
    assert isinstance(good, llmos.SentimentResult)
    assert (good.label, bad.label) == ("POSITIVE", "NEGATIVE")
    emb = model.execute(llmos.EmbeddingTask(texts=["a cat", "a kitten", "a tax form"]), timeout=60)
    cat, kitten, tax = emb.vectors
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(cat, kitten) > dot(cat, tax)


def test_duplicate_message_runs_the_job_once(client, services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    (job, _), = manager.create_jobs(engine, [manager.NewJob(
        model="minilm", task_type="sentiment", input={"text": "fine"}, priority=5)])
    dispatcher = CeleryDispatcher(settings)
    dispatcher.send([job, job, job])  # three deliveries of one job
    done = client.wait([job.id], timeout=60)[job.id]
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1
    import time

    import redis as redis_lib

    r = redis_lib.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 30
    while (r.llen("llmos.minilm:4") or r.hlen("unacked")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the other two deliveries were taken and acked
    assert r.llen("llmos.minilm:4") == 0 and r.hlen("unacked") == 0
    j = manager.get_job(engine, job.id, tenant=manager.ANY_TENANT)
    assert j.attempts == 1 and j.finishes == 1


def test_cancelled_job_message_is_a_noop(client, services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    (job, _), = manager.create_jobs(engine, [manager.NewJob(
        model="minilm", task_type="sentiment", input={"text": "fine"}, priority=5)])
    assert manager.cancel(engine, job.id, tenant=manager.ANY_TENANT)
    CeleryDispatcher(settings).send([job])
    marker = client.load_model("minilm").submit(llmos.SentimentTask(text="after"), priority=0)
    marker.result(timeout=60)  # priority 0 goes last: the cancelled message was consumed before it
    j = manager.get_job(engine, job.id, tenant=manager.ANY_TENANT)
    assert j.status == JobStatus.CANCELLED and j.started_at is None and j.attempts == 0


def test_poison_input_fails_alone_and_worker_keeps_serving(client, services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    # bypass SDK validation, as a row written by an older producer or by hand would
    created = manager.create_jobs(engine, [
        manager.NewJob(model="minilm", task_type="sentiment", input={"text": ""}, priority=5),
        manager.NewJob(model="minilm", task_type="sentiment", input={"wrong": 1}, priority=5),
        manager.NewJob(model="minilm", task_type="sentiment", input={"text": "lovely"}, priority=5),
    ])
    CeleryDispatcher(settings).send([j for j, _ in created])
    done = client.wait([j.id for j, _ in created], timeout=60)
    empty, wrong, good = (done[j.id] for j, _ in created)
    assert empty.status == JobStatus.FAILED and empty.error.startswith("invalid sentiment task: text:")
    assert wrong.status == JobStatus.FAILED and "text: Field required" in wrong.error
    assert good.status == JobStatus.SUCCEEDED
    again = client.load_model("minilm").execute(llmos.SentimentTask(text="still here"), timeout=60)
    assert again.label in ("POSITIVE", "NEGATIVE")


def test_nothing_is_stored_in_celery_result_keys(client, services, redis_url):
    import redis

    client.load_model("minilm").execute(llmos.SentimentTask(text="ok"), timeout=60)
    keys = redis.Redis.from_url(redis_url).keys("celery-task-meta-*")
    assert keys == []
    with get_engine(services[0].db_url).connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(jobs)).scalar() > 0
