"""GET /metrics on two real API processes, a real minilm worker, Postgres and Redis: the counts the
Prometheus parser reads equal the task table's, and both processes answer the same numbers."""

from __future__ import annotations

import time

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from llmos import manager
from llmos.db import get_engine, job_rollup_watermark, job_rollups, jobs, webhook_deliveries, webhook_rollups
from llmos.dispatch import CeleryDispatcher
from llmos import rollup
from tests import helpers
from tests.integration.test_api import ApiProcess, free_port, new_key

pytestmark = pytest.mark.integration

TOKEN = "metrics-scrape-token-7f3a9c"


@pytest.fixture(scope="module")
def apis(services, request):
    """Two API processes with the scrape token, started while the worker loads; the rollup emptied
    (the module's `services` emptied the task table, not the rollup of earlier modules' jobs)."""
    settings, env = services
    with get_engine(settings.db_url).begin() as conn:
        conn.execute(job_rollups.delete())
        conn.execute(webhook_rollups.delete())
        conn.execute(webhook_deliveries.delete())
        conn.execute(job_rollup_watermark.update().values(folded_to=None, refreshed_at=None))
    # webhooks to a closed local port fail at once and, past 1 s of failing, are given up
    procs = [ApiProcess(env, LLMOS_API_METRICS_TOKEN=TOKEN, LLMOS_API_WEBHOOK_ALLOW_PRIVATE="true",
                        LLMOS_API_WEBHOOK_GIVE_UP_AFTER_S="1") for _ in range(2)]
    try:
        request.getfixturevalue("pg_worker")
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


def scrape(url: str, token: str = TOKEN) -> dict:
    resp = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def samples(family, name: str | None = None) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            if name is None or s.name == name}


def submit(url, headers, model, task, inputs, **options) -> list[str]:
    ids = []
    for body in inputs:
        resp = httpx.post(url + "/v1/jobs", json={"model": model, "task": task, "input": body, **options},
                          headers=headers, timeout=30)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    return ids


COMPARED = ("llmos_jobs", "llmos_job_retries", "llmos_tokens_in", "llmos_tokens_out", "llmos_job_queue_wait_seconds",
            "llmos_job_compute_seconds", "llmos_job_latency_seconds", "llmos_job_batch_size", "llmos_jobs_unfinished",
            "llmos_queue_messages", "llmos_workers_alive", "llmos_webhook_failures", "llmos_webhook_given_up",
            "llmos_webhook_pending", "llmos_up")
"""The families both API processes must answer identically (the capacity figures are measured
against each scrape's own clock, and the rollup's tail size depends on when each scrape folded)."""


def test_two_api_processes_report_the_task_tables_counts(apis, services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    a, b = apis
    acme, globex = new_key(engine, "acme"), new_key(engine, "globex")
    admin_key = manager.create_api_key(engine, tenant="ops", admin=True)[1]

    # the first wave: succeeded jobs of two tenants through both processes, and poison inputs that fail
    ids = submit(a.url, acme, "minilm", "sentiment", [{"text": f"great thing {i}"} for i in range(6)])
    ids += submit(b.url, globex, "minilm", "embed", [{"texts": [f"doc {i}", "more"]} for i in range(4)])
    poison = manager.create_jobs(engine, [  # bypass validation, as a row written by hand would
        manager.NewJob(model="minilm", task_type="sentiment", input={"text": ""}, priority=5, tenant="acme"),
        manager.NewJob(model="minilm", task_type="sentiment", input={"wrong": 1}, priority=5, tenant="globex")])
    CeleryDispatcher(settings).send([j for j, _ in poison])
    ids += [j.id for j, _ in poison]
    # a webhook nobody answers (a free port: connection refused): one failed POST, then given up
    ids += submit(a.url, acme, "minilm", "sentiment", [{"text": "hooked"}],
                  webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    helpers.wait_all_final(engine, ids, timeout=120)
    deadline = time.monotonic() + 60
    while True:
        with engine.connect() as conn:
            hook = conn.execute(sa.select(webhook_deliveries)).one()
        if hook.given_up_at is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hook.given_up_at is not None and hook.attempts == 1, hook
    # fold everything so far into the rollup: the scrapes then add the rollup and the live tail
    folded = rollup.refresh(engine, lag_s=0.0)
    assert folded.jobs == len(ids)

    # the second wave (the tail): more successes, cancelled jobs of a model no worker serves, an expiry
    ids2 = submit(b.url, acme, "minilm", "summarize", [{"text": "LLMOS runs NLP jobs on language models. " * 3}])
    ids2 += submit(a.url, globex, "minilm", "sentiment", [{"text": "awful"}, {"text": "fine"}])
    queued = submit(a.url, globex, "gpt2", "writing", [{"prompt": "Once"}, {"prompt": "Twice"}])
    for job_id in queued:
        assert httpx.delete(f"{b.url}/v1/jobs/{job_id}", headers=globex, timeout=30).status_code == 200
    (late, _), = manager.create_jobs(engine, [manager.NewJob(model="gpt2", task_type="writing", input={"prompt": "x"},
                                                             priority=3, tenant="acme", deadline_in_s=0.2)])
    waiting = submit(a.url, acme, "gpt2", "writing", [{"prompt": "stays queued"}])  # stays queued: no gpt2 worker
    helpers.wait_all_final(engine, ids2, timeout=120)
    time.sleep(0.3)
    manager.expire_overdue(engine)  # the reconciler's step 1 (the stack's own reconciler may have done it)
    assert manager.get_job(engine, late.id, tenant=manager.ANY_TENANT).status.value == "expired"

    first, second = scrape(a.url), scrape(b.url, admin_key)
    for name in COMPARED:
        assert samples(first[name]) == samples(second[name]), name

    with engine.connect() as conn:
        table = {tuple(r[:4]): r[4] for r in conn.execute(
            sa.select(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.status, sa.func.count())
            .where(jobs.c.finished_at.is_not(None))
            .group_by(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.status))}
        started = conn.execute(sa.select(sa.func.count()).where(jobs.c.queue_wait_ms.is_not(None))).scalar()
        finished = conn.execute(sa.select(sa.func.count()).where(jobs.c.finished_at.is_not(None))).scalar()
        tokens = conn.execute(sa.select(sa.func.sum(jobs.c.tokens_in)).where(jobs.c.finished_at.is_not(None))).scalar()
    got = {(d["model"], d["task"], d["tenant"], d["status"]): v
           for (_, labels), v in samples(first["llmos_jobs"], "llmos_jobs_total").items() for d in [dict(labels)]}
    assert got == table
    assert {s for *_, s in table} == {"succeeded", "failed", "cancelled", "expired"}
    assert table[("minilm", "sentiment", "acme", "failed")] == 1 and table[("gpt2", "writing", "globex", "cancelled")] == 2
    assert sum(samples(first["llmos_job_latency_seconds"], "llmos_job_latency_seconds_count").values()) == finished
    assert sum(samples(first["llmos_job_queue_wait_seconds"], "llmos_job_queue_wait_seconds_count").values()) == started
    assert sum(samples(first["llmos_tokens_in"], "llmos_tokens_in_total").values()) == tokens > 0
    # the second wave is the tail (unless a scrape came over a minute after the fold: then it folded some)
    assert samples(first["llmos_rollup_tail_jobs"])[("llmos_rollup_tail_jobs", ())] <= finished - folded.jobs
    with engine.connect() as conn:
        folded_to = conn.execute(sa.select(job_rollup_watermark.c.folded_to)).scalar()
        in_rollup = conn.execute(sa.select(sa.func.sum(job_rollups.c.jobs))).scalar()
        tail = conn.execute(sa.select(sa.func.count()).where(jobs.c.finished_at >= folded_to)).scalar()
    assert in_rollup + tail == finished  # every job once: in the rollup or in the tail

    unfinished = samples(first["llmos_jobs_unfinished"])
    assert unfinished == {("llmos_jobs_unfinished", (("model", "gpt2"), ("priority", "5"), ("state", "queued"),
                                                     ("task", "writing"), ("tenant", "acme"))): 1.0}
    messages = samples(first["llmos_queue_messages"])
    # gpt2's three messages are still in Redis (two of cancelled jobs: a worker would skip them)
    assert messages[("llmos_queue_messages", (("model", "gpt2"), ("priority", "5")))] == 3.0
    assert sum(v for (_, labels), v in messages.items() if dict(labels)["model"] == "minilm") == 0.0
    alive = samples(first["llmos_workers_alive"])
    assert alive == {("llmos_workers_alive", (("device", "cpu"), ("model", "minilm"))): 1.0}
    assert samples(first["llmos_up"]) == {("llmos_up", (("component", "database"),)): 1.0,
                                          ("llmos_up", (("component", "redis"),)): 1.0}
    hooks = {name: samples(first[name]) for name in ("llmos_webhook_failures", "llmos_webhook_given_up",
                                                       "llmos_webhook_pending")}
    assert hooks == {"llmos_webhook_failures": {("llmos_webhook_failures_total", (("tenant", "acme"),)): 1.0},
                     "llmos_webhook_given_up": {("llmos_webhook_given_up_total", (("tenant", "acme"),)): 1.0},
                     "llmos_webhook_pending": {("llmos_webhook_pending", (("tenant", "acme"),)): 0.0}}
    assert waiting


def test_metrics_auth_over_http(apis, services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    url = apis[0].url
    resp = httpx.get(url + "/metrics", timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert resp.headers["www-authenticate"] == "Bearer"
    resp = httpx.get(url + "/metrics", headers=new_key(engine, "acme"), timeout=30)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    resp = httpx.get(url + "/metrics", headers={"Authorization": "Bearer " + TOKEN + "x"}, timeout=30)
    assert resp.status_code == 401
    assert "llmos_jobs" in scrape(url)


def test_tail_and_unfinished_queries_use_indexes(services):
    """EXPLAIN on Postgres beside a few thousand finished rows (ANALYZEd): the tail aggregate reads a
    range of ix_jobs_finished_at_id, the unfinished gauge an index over the few open rows."""
    settings, _ = services
    engine = get_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO jobs (id, model, task_type, priority, status, input, tenant, created_at, finished_at, attempts)
            SELECT gen_random_uuid(), 'explain', 'embed', 5, 'succeeded', '{}'::jsonb, 'explain',
                   now() - interval '30 days' + i * interval '1 minute', now() - interval '30 days' + i * interval '1 minute', 1
            FROM generate_series(1, 5000) AS i"""))
        conn.execute(sa.text("ANALYZE jobs"))
    rollup.refresh(engine)  # the watermark near now: the tail is the last minute's jobs
    dialect = engine.dialect
    with rollup.snapshot(engine) as conn, conn.begin():
        folded_to = conn.execute(sa.select(job_rollup_watermark.c.folded_to)).scalar()
        tail = (sa.select(*[jobs.c[c] for c in rollup.LABELS], *rollup.aggregates("postgresql"))
                .where(*rollup._finished(folded_to, None)).group_by(*[jobs.c[c] for c in rollup.LABELS]))
        plans = {}
        for name, stmt in (("tail", tail),):
            sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
            plans[name] = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
        status_in = jobs.c.status.in_([sa.literal_column("'queued'"), sa.literal_column("'running'")])
        q = sa.select(jobs.c.model, sa.func.count()).where(status_in).group_by(jobs.c.model)
        sql = str(q.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        plans["unfinished"] = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
    assert "ix_jobs_finished_at_id" in plans["tail"] and "Seq Scan on jobs" not in plans["tail"], plans["tail"]
    assert "Seq Scan on jobs" not in plans["unfinished"], plans["unfinished"]


def test_folds_racing_on_postgres_fold_each_job_exactly_once(services):
    """Four threads, each with its own engine, fold hour-sized steps of two days of jobs at once,
    some waiting for the lock (wait=True) and some skipping it: every job is folded exactly once."""
    import threading
    from datetime import timedelta

    settings, _ = services
    engine = get_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(jobs.delete())
        conn.execute(job_rollups.delete())
        conn.execute(job_rollup_watermark.update().values(folded_to=None))
        conn.execute(sa.text("""
            INSERT INTO jobs (id, model, task_type, priority, status, input, tenant, created_at, finished_at, attempts)
            SELECT gen_random_uuid(), 'm' || (i % 3), 'embed', 5, (ARRAY['succeeded','failed'])[1 + i % 2], '{}'::jsonb,
                   't' || (i % 4), now() - interval '2 days' + i * interval '17 seconds',
                   now() - interval '2 days' + i * interval '17 seconds' + interval '1 second', 2
            FROM generate_series(1, 10000) AS i"""))
    engines = [sa.create_engine(settings.db_url) for _ in range(4)]
    results, errors = [], []

    def fold(e, wait):
        try:
            for _ in range(3):
                results.append(rollup.refresh(e, max_step_s=3600.0, wait=wait))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fold, args=(e, i % 2 == 0)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    assert errors == []
    with engine.connect() as conn:
        folded_to = conn.execute(sa.select(job_rollup_watermark.c.folded_to)).scalar()
        behind = conn.execute(sa.select(sa.func.count()).where(jobs.c.finished_at < folded_to)).scalar()
        in_rollup = conn.execute(sa.select(sa.func.sum(job_rollups.c.jobs))).scalar()
        by_key = dict(((m, t, s), n) for m, t, s, n in conn.execute(
            sa.select(jobs.c.model, jobs.c.tenant, jobs.c.status, sa.func.count())
            .where(jobs.c.finished_at < folded_to).group_by(jobs.c.model, jobs.c.tenant, jobs.c.status)))
        rolled = dict(((m, t, s), n) for m, t, s, n in conn.execute(
            sa.select(job_rollups.c.model, job_rollups.c.tenant, job_rollups.c.status, sa.func.sum(job_rollups.c.jobs))
            .group_by(job_rollups.c.model, job_rollups.c.tenant, job_rollups.c.status)))
    assert behind == in_rollup == sum(r.jobs for r in results) and behind > 9000
    assert rolled == by_key
    assert folded_to is not None and timedelta(0) < (manager.db_now(engine) - folded_to) < timedelta(minutes=5)


def _queued(engine, tenant: str, n: int = 1) -> list[str]:
    created = manager.create_jobs(engine, [manager.NewJob(model="gpt2", task_type="writing", input={"prompt": "x"},
                                                          priority=5, tenant=tenant) for _ in range(n)])
    return [job.id for job, _ in created]


def _tenant_totals(engine, tenant: str) -> dict:
    with rollup.snapshot(engine) as conn, conn.begin():
        totals = rollup.totals(conn)
    out = {}
    for (_, _, t, status), v in totals.by_key.items():
        if t == tenant:
            out[status] = out.get(status, 0) + v["jobs"]
            out["retries"] = out.get("retries", 0) + v["retries"]
    return out


def test_a_long_finishing_transaction_is_not_folded_past_on_postgres(services):
    """A transaction stamps finished_at with its start and commits much later (a large batch's
    cancel): the fold's upper bound stops at its start while it is open, so its jobs are counted."""
    import uuid
    from datetime import timedelta

    settings, _ = services
    engine = get_engine(settings.db_url)
    tenant = f"long-{uuid.uuid4().hex[:8]}"
    ids = _queued(engine, tenant, 3)
    rollup.refresh(engine, wait=True)
    with engine.connect() as long_tx:
        long_tx.begin()
        long_tx.execute(jobs.update().where(jobs.c.id.in_(ids)).values(
            status="cancelled", finished_at=sa.func.now(), error="cancelled by user"))
        started = long_tx.execute(sa.select(sa.func.now())).scalar()
        # a fold as if a long time had passed: without the clamp it would move far past `started`
        rollup.refresh(engine, now=manager.db_now(engine) + timedelta(hours=1), wait=True)
        with engine.connect() as conn:
            assert manager.as_utc(conn.execute(sa.select(job_rollup_watermark.c.folded_to)).scalar()) <= started
        long_tx.commit()
    assert _tenant_totals(engine, tenant) == {"cancelled": 3, "retries": 0}
    rollup.refresh(engine, lag_s=0.0, wait=True)
    assert _tenant_totals(engine, tenant) == {"cancelled": 3, "retries": 0}
    with engine.connect() as conn:
        folded = conn.execute(sa.select(sa.func.sum(job_rollups.c.jobs)).where(job_rollups.c.tenant == tenant)).scalar()
    assert folded == 3


def test_an_operator_retry_keeps_the_counters_on_postgres(services):
    """fail (tail), retry, fail, fold, retry, succeed: the totals never go down and count finishes."""
    import uuid

    settings, _ = services
    engine = get_engine(settings.db_url)
    tenant = f"retry-{uuid.uuid4().hex[:8]}"
    [job] = _queued(engine, tenant)

    def end(status, attempts):
        with engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job).values(
                status=status, attempts=attempts, finished_at=sa.func.now(), error="boom" if status == "failed" else None))

    seen = []

    def check(want):
        got = _tenant_totals(engine, tenant)
        for earlier in seen:
            assert all(got.get(k, 0) >= v for k, v in earlier.items()), (earlier, got)
        seen.append(got)
        assert got == want

    end("failed", 3)
    check({"failed": 1, "retries": 2})
    assert manager.retry_failed(engine, job, tenant=tenant).max_attempts == 6
    check({"failed": 1, "retries": 2})
    end("failed", 6)
    check({"failed": 2, "retries": 4})
    rollup.refresh(engine, lag_s=0.0, wait=True)
    assert manager.retry_failed(engine, job, tenant=tenant).max_attempts == 9
    check({"failed": 2, "retries": 4})
    end("succeeded", 7)
    check({"failed": 2, "succeeded": 1, "retries": 4})
    rollup.refresh(engine, lag_s=0.0, wait=True)
    check({"failed": 2, "succeeded": 1, "retries": 4})
