"""State transitions on a real SQLite task table (the same module runs on Postgres in integration)."""

import pytest

from llmos import manager
from llmos.db import get_engine
from llmos.jobs import JobStatus


@pytest.fixture
def engine(sqlite_settings):
    return get_engine(sqlite_settings.db_url)


def new(n=1, **kw):
    base = dict(model="minilm", task_type="sentiment", input={"text": "x"}, priority=5)
    base.update(kw)
    return [manager.NewJob(**base) for _ in range(n)]


def test_create_writes_queued_rows(engine):
    created = manager.create_jobs(engine, new(3))
    assert [c for _, c in created] == [True] * 3
    rows = manager.get_jobs(engine, [j.id for j, _ in created], tenant=manager.ANY_TENANT)
    assert {j.status for j in rows.values()} == {JobStatus.QUEUED}
    assert all(j.queued_at is not None and j.attempts == 0 for j in rows.values())


def test_claim_is_conditional_and_counts_attempts(engine):
    (job, _), = manager.create_jobs(engine, new())
    first, _ = manager.claim(engine, [job.id], worker_id="w1", device="cpu")
    second, _ = manager.claim(engine, [job.id], worker_id="w2", device="cpu")
    assert [j.id for j in first] == [job.id] and first[0].attempts == 1
    assert first[0].status == JobStatus.RUNNING and first[0].worker_id == "w1"
    assert second == []  # a duplicate message claims nothing


def test_claim_skips_other_models(engine):
    (job, _), = manager.create_jobs(engine, new(model="other"))
    assert manager.claim(engine, [job.id], worker_id="w", device="cpu", model="minilm") == ([], [])
    assert manager.get_job(engine, job.id, tenant=manager.ANY_TENANT).status == JobStatus.QUEUED


def test_finish_applies_only_to_the_current_attempt(engine):
    (a, _), (b, _) = manager.create_jobs(engine, new(2))
    (ca, cb), _ = manager.claim(engine, [a.id, b.id], worker_id="w1", device="cpu")
    applied = manager.finish(engine, [
        manager.Outcome(job_id=a.id, worker_id="w1", attempt=1, result={"label": "POSITIVE", "score": 0.9},
                        compute_ms=3.0, batch_size=2, queue_wait_ms=1.5),
        manager.Outcome(job_id=b.id, worker_id="w1", attempt=1, error="boom", batch_size=2),
    ])
    assert applied == 2
    ja, jb = manager.get_job(engine, a.id, tenant=manager.ANY_TENANT), manager.get_job(engine, b.id, tenant=manager.ANY_TENANT)
    assert ja.status == JobStatus.SUCCEEDED and ja.result == {"label": "POSITIVE", "score": 0.9}
    assert ja.compute_ms == 3.0 and ja.batch_size == 2 and ja.queue_wait_ms == 1.5 and ja.finished_at
    assert jb.status == JobStatus.FAILED and jb.error == "boom"
    # a late second finish (another worker, or the same again) changes nothing
    late = manager.finish(engine, [manager.Outcome(job_id=a.id, worker_id="w2", attempt=1, error="late")])
    again = manager.finish(engine, [manager.Outcome(job_id=a.id, worker_id="w1", attempt=1, error="again")])
    assert late == 0 and again == 0
    assert manager.get_job(engine, a.id, tenant=manager.ANY_TENANT).status == JobStatus.SUCCEEDED


def test_cancel_queued_and_running(engine):
    (a, _), (b, _) = manager.create_jobs(engine, new(2))
    manager.claim(engine, [b.id], worker_id="w", device="cpu")
    assert manager.cancel(engine, a.id, tenant=manager.ANY_TENANT) is True
    assert manager.cancel(engine, a.id, tenant=manager.ANY_TENANT) is False  # already final
    assert manager.cancel(engine, b.id, tenant=manager.ANY_TENANT) is True  # running: its worker stops it, its finish won't apply
    assert manager.get_job(engine, a.id, tenant=manager.ANY_TENANT).status == JobStatus.CANCELLED
    assert manager.claim(engine, [a.id], worker_id="w", device="cpu") == ([], [])  # its message is a no-op
    late = manager.finish(engine, [manager.Outcome(job_id=b.id, worker_id="w", attempt=1, result={})])
    assert late == 0 and manager.get_job(engine, b.id, tenant=manager.ANY_TENANT).status == JobStatus.CANCELLED


def test_finish_from_an_older_attempt_does_not_overwrite_a_newer_one(engine):
    (a, _), = manager.create_jobs(engine, new())
    manager.claim(engine, [a.id], worker_id="w1", device="cpu")
    manager.register_worker(engine, worker_id="w1", host="h", pid=1, model="minilm", device="cpu")
    manager.stop_worker(engine, "w1")  # w1 is presumed dead
    requeued, failed = manager.requeue_dead(engine, dead_after_s=30)
    assert [j.id for j in requeued] == [a.id] and failed == []
    (again,), _ = manager.claim(engine, [a.id], worker_id="w2", device="cpu")
    assert again.attempts == 2 and again.status == JobStatus.RUNNING
    # w1 was only slow: its finish of attempt 1 arrives now, while attempt 2 runs on w2
    assert manager.finish(engine, [manager.Outcome(job_id=a.id, worker_id="w1", attempt=1, result={"x": 1})]) == 0
    assert manager.finish(engine, [manager.Outcome(job_id=a.id, worker_id="w2", attempt=1, result={"x": 1})]) == 0
    assert manager.get_job(engine, a.id, tenant=manager.ANY_TENANT).status == JobStatus.RUNNING
    assert manager.finish(engine, [manager.Outcome(job_id=a.id, worker_id="w2", attempt=2, result={"x": 2})]) == 1
    done = manager.get_job(engine, a.id, tenant=manager.ANY_TENANT)
    assert done.result == {"x": 2} and done.finishes == 1


def test_requeue_dead_fails_past_max_attempts(engine):
    (a, _), = manager.create_jobs(engine, new(max_attempts=2))
    for attempt in (1, 2):
        (job,), _ = manager.claim(engine, [a.id], worker_id=f"gone{attempt}", device="cpu")
        assert job.attempts == attempt
        requeued, failed = manager.requeue_dead(engine, dead_after_s=30)  # no worker row: dead
    assert requeued == [] and [j.id for j in failed] == [a.id]
    j = manager.get_job(engine, a.id, tenant=manager.ANY_TENANT)
    assert j.status == JobStatus.FAILED and "worker lost during attempt 2 of 2" in j.error


def test_deadline_expires_at_claim_and_in_the_reconciler(engine):
    from datetime import timedelta

    past = manager.utcnow() - timedelta(seconds=1)
    (a, _), (b, _), (c, _) = manager.create_jobs(engine, new(deadline=past) + new(deadline=past) + new())
    claimed, expired = manager.claim(engine, [a.id, c.id], worker_id="w", device="cpu")
    assert [j.id for j in claimed] == [c.id] and expired == [a.id]
    assert manager.expire_overdue(engine) == [b.id]
    assert manager.get_job(engine, b.id, tenant=manager.ANY_TENANT).status == JobStatus.EXPIRED


def test_retry_later_waits_out_its_backoff(engine):
    (a, _), = manager.create_jobs(engine, new())
    (job,), _ = manager.claim(engine, [a.id], worker_id="w", device="cpu")
    out = manager.Outcome(job_id=a.id, worker_id="w", attempt=1, error="429 from the endpoint")
    assert manager.retry_later(engine, [out], [3600]) == 1
    assert manager.claim(engine, [a.id], worker_id="w", device="cpu") == ([], [])  # not due yet
    assert manager.due_retries(engine) == []
    manager.retry_later(engine, [out], [0])  # no-op: no longer running
    j = manager.get_job(engine, a.id, tenant=manager.ANY_TENANT)
    assert j.status == JobStatus.QUEUED and "retrying: 429" in j.error and j.run_after is not None


def test_timeouts_are_failed_by_the_reconciler(engine):
    (a, _), (b, _) = manager.create_jobs(engine, new(timeout_s=0.01) + new(timeout_s=3600))
    manager.claim(engine, [a.id, b.id], worker_id="w", device="cpu")
    import time

    time.sleep(0.05)
    assert manager.fail_timed_out(engine, grace_s=0) == [a.id]
    assert "timeout" in manager.get_job(engine, a.id, tenant=manager.ANY_TENANT).error


def test_idempotency_key_returns_existing_job(engine):
    (first, created1), = manager.create_jobs(engine, new(idempotency_key="k1"))
    (second, created2), = manager.create_jobs(engine, new(idempotency_key="k1"))
    (other, created3), = manager.create_jobs(engine, new(idempotency_key="k1", tenant="t2"))
    assert created1 and not created2 and created3
    assert second.id == first.id and other.id != first.id


def test_repeated_key_in_one_call_yields_one_job(engine):
    out = manager.create_jobs(engine, new(2, idempotency_key="same"))
    assert out[0][0].id == out[1][0].id and [c for _, c in out] == [True, False]  # sent once
    assert len(manager.get_jobs(engine, [out[0][0].id], tenant=manager.ANY_TENANT)) == 1


def test_status_counts(engine):
    created = manager.create_jobs(engine, new(3))
    ids = [j.id for j, _ in created]
    assert manager.cancel(engine, ids[0], tenant=manager.ANY_TENANT)
    counts = manager.status_counts(engine, ids, tenant=manager.ANY_TENANT)
    assert counts == {JobStatus.CANCELLED: 1, JobStatus.QUEUED: 2}


def test_worker_rows_and_heartbeat(engine):
    manager.register_worker(engine, worker_id="m@h:1", host="h", pid=1, model="minilm", device="cpu")
    manager.heartbeat(engine, "m@h:1")
    assert [w["id"] for w in manager.live_workers(engine, "minilm")] == ["m@h:1"]
    manager.stop_worker(engine, "m@h:1")
    assert manager.live_workers(engine, "minilm") == []


def test_finish_stores_text_the_database_cannot_hold_as_replacement_characters(engine):
    (a, _), (b, _) = manager.create_jobs(engine, new(2))
    manager.claim(engine, [a.id, b.id], worker_id="w", device="cpu")
    applied = manager.finish(engine, [
        manager.Outcome(job_id=a.id, worker_id="w", attempt=1, result={"text": "nul\x00 half\ud83d ok😀", "k\x00": 1}),
        manager.Outcome(job_id=b.id, worker_id="w", attempt=1, error="bad \x00 \udfff output"),
    ])
    assert applied == 2
    got = manager.get_jobs(engine, [a.id, b.id], tenant=manager.ANY_TENANT)
    assert got[a.id].result == {"text": "nul\ufffd half\ufffd ok😀", "k\ufffd": 1}
    assert got[b.id].error == "bad \ufffd \ufffd output"


@pytest.mark.parametrize("value", [{"a": "plain"}, {"a": "é 😀 \\u0000 \\\\u0000"}, ["\\", 1.5, None, True]])
def test_the_json_serializer_leaves_storable_values_alone(value):
    import json

    from llmos.db import dump_json

    assert json.loads(dump_json(value)) == value


def test_a_key_naming_another_job_is_refused(engine):
    from llmos.errors import IdempotencyConflictError

    (a, _), = manager.create_jobs(engine, new(idempotency_key="k"))
    (again, created), = manager.create_jobs(engine, new(idempotency_key="k"))
    assert again.id == a.id and not created
    with pytest.raises(IdempotencyConflictError, match=f"already names job {a.id} with another input"):
        manager.create_jobs(engine, new(idempotency_key="k", input={"text": "y"}))
    (other, created), = manager.create_jobs(engine, new(idempotency_key="k", tenant="t2", input={"text": "y"}))
    assert created and other.id != a.id  # keys are per tenant


def test_reclaim_returns_jobs_already_running_under_the_same_worker(engine):
    (a, _), (b, _), (c, _), (d, _) = manager.create_jobs(engine, new(4))
    manager.claim(engine, [a.id], worker_id="w1", device="cpu")  # committed; its reply was lost
    manager.claim(engine, [b.id], worker_id="w2", device="cpu")
    plain, _ = manager.claim(engine, [a.id, b.id, c.id], worker_id="w1", device="cpu")
    assert [j.id for j in plain] == [c.id]  # a plain claim does not see a
    back, _ = manager.claim(engine, [a.id, b.id, d.id], worker_id="w1", device="cpu", reclaim=True)
    assert sorted(j.id for j in back) == sorted([a.id, d.id])  # not b: another worker runs it
    assert manager.get_job(engine, a.id, tenant=manager.ANY_TENANT).attempts == 1
