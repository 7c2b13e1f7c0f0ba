"""The fast publish path writes exactly what Celery would, and real workers consume it."""

import json

import pytest
import redis

import llmos
from llmos.dispatch import CeleryDispatcher, make_celery, pending_set, queue_name
from llmos.constants import RUN_JOB_TASK
from llmos.jobs import Job, JobStatus
from llmos.priority import broker_priority
from llmos.sdk import Client

pytestmark = pytest.mark.integration


def only_message(r, key):
    items = r.lrange(key, 0, -1)
    assert len(items) == 1, (key, items)
    return json.loads(items[0])


def test_message_matches_celery_send_task(redis_url, tmp_path):
    from llmos.settings import Settings

    settings = Settings(home=tmp_path, redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    job = Job(id="7a1f0e4e-1111-4222-8333-944455556666", model="fmt", task_type="sentiment", priority=7,
              status=JobStatus.QUEUED, input={"text": "x"})
    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        app.send_task(RUN_JOB_TASK, args=[job.id], queue=queue_name("fmt"), priority=broker_priority(7),
                      producer=producer, ignore_result=True)
    key = f"{queue_name('fmt')}:{broker_priority(7)}"
    theirs = only_message(r, key)
    r.delete(key)
    d = CeleryDispatcher(settings)
    d.send([job])
    ours = only_message(r, key)
    d.close()
    app.close()
    assert r.sismember(pending_set("fmt"), job.id)
    # same structure, same routing and priority, same body; ids and tags are fresh per message
    assert set(ours) == set(theirs) and set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    for field in ("body", "content-encoding", "content-type"):
        assert ours[field] == theirs[field]
    for field in ("task", "argsrepr", "kwargsrepr", "ignore_result", "lang", "retries"):
        assert ours["headers"][field] == theirs["headers"][field]
    for field in ("delivery_info", "priority", "body_encoding", "delivery_mode"):
        assert ours["properties"][field] == theirs["properties"][field]


def test_chunk_message_matches_celery_send_task_and_packs_by_model_and_priority(redis_url, tmp_path):
    """A bulk submit's message carries several ids (args [[id, ...]]) exactly as Celery's own
    send_task would write it; runs of another model or priority start a new message."""
    from llmos.settings import Settings
    from llmos.transport import job_ids_of_payload

    settings = Settings(home=tmp_path, redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    r = redis.Redis.from_url(redis_url)
    r.flushdb()

    def mk(i, model="fmt", priority=7):
        return Job(id=f"7a1f0e4e-1111-4222-8333-9444555{i:05d}", model=model, task_type="sentiment",
                   priority=priority, status=JobStatus.QUEUED, input={"text": "x"})

    three = [mk(i) for i in range(3)]
    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        app.send_task(RUN_JOB_TASK, args=[[j.id for j in three]], queue=queue_name("fmt"),
                      priority=broker_priority(7), producer=producer, ignore_result=True)
    key = f"{queue_name('fmt')}:{broker_priority(7)}"
    theirs = only_message(r, key)
    r.delete(key)
    d = CeleryDispatcher(settings)
    d.send(three, chunk=32)
    ours = only_message(r, key)
    for field in ("body", "content-encoding", "content-type"):
        assert ours[field] == theirs[field]
    assert ours["headers"]["argsrepr"] == theirs["headers"]["argsrepr"]
    assert job_ids_of_payload(ours) == [j.id for j in three]
    assert r.smembers(pending_set("fmt")) == {j.id.encode() for j in three}
    r.flushdb()
    # 5 jobs at priority 7, 2 at 3, 2 more at 7, 1 of another model; chunks of at most 4
    mixed = [mk(i) for i in range(5)] + [mk(10 + i, priority=3) for i in range(2)] \
        + [mk(20 + i) for i in range(2)] + [mk(30, model="other")]
    d.send(mixed, chunk=4)
    d.close()
    app.close()
    lists = {k.decode(): [job_ids_of_payload(json.loads(m)) for m in reversed(r.lrange(k, 0, -1))]
             for k in r.keys("llmos.*")}
    low = f"{queue_name('fmt')}:{broker_priority(3)}"
    assert lists[key] == [[m.id for m in mixed[0:4]], [mixed[4].id], [m.id for m in mixed[7:9]]]
    assert lists[low] == [[m.id for m in mixed[5:7]]]
    assert lists[queue_name("other") + (f":{broker_priority(7)}" if broker_priority(7) else "")] == [[mixed[9].id]]


def test_results_are_never_mixed_between_jobs_of_a_batch(services, pg_worker, tmp_path):
    from llmos.registry import Registry
    from workers import model_cache
    from workers.runners import runners_for

    settings, _ = services
    texts = [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][i % 4] for _ in range(1 + i % 7))
             for i in range(96)]
    with Client(settings) as client:
        handles = client.load_model("minilm").submit_many([llmos.EmbeddingTask(texts=[t]) for t in texts])
        jobs = client.wait([h.id for h in handles], timeout=120)
    assert max(j.batch_size for j in jobs.values()) > 1
    runner = runners_for(model_cache.get(Registry.load(settings).get("minilm"), "cpu"))["embed"]
    for h, t in zip(handles, texts):
        got = jobs[h.id].result["vectors"][0]
        want = runner.run([llmos.EmbeddingTask(texts=[t])])[0].result["vectors"][0]
        assert sum(a * b for a, b in zip(got, want)) > 0.9999, t  # its own text's vector
