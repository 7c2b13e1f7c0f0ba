"""Aging (the promotion rule, one step per pass, the ceiling, the re-send) and tenant shares (the
weights, the compute per tenant, the step-down rule) on a real SQLite task table."""

from datetime import timedelta

import pytest

from llmos import manager
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher, queue_key
from llmos.errors import ConfigError
from llmos.jobs import JobStatus
from llmos.priority import broker_priority
from llmos.reconciler import _sent_at
from llmos.scheduling import aging, shares
from llmos.settings import Settings


@pytest.fixture
def engine(sqlite_settings):
    return get_engine(sqlite_settings.db_url)


@pytest.fixture(autouse=True)
def _fresh_caches():
    shares.clear_cache()
    yield
    shares.clear_cache()


def make(engine, n=1, *, waited_s=0.0, aged=0, **kw):
    base = dict(model="minilm", task_type="sentiment", input={"text": "x"}, priority=1)
    base.update(kw)
    created = [j for j, _ in manager.create_jobs(engine, [manager.NewJob(**base) for _ in range(n)])]
    ids = [j.id for j in created]
    with engine.begin() as conn:  # the test's clock: as if queued `waited_s` ago
        conn.execute(jobs.update().where(jobs.c.id.in_(ids)).values(
            queued_at=manager.utcnow() - timedelta(seconds=waited_s), aged=aged))
    return ids


def rows(engine, ids):
    found = manager.get_jobs(engine, ids, tenant=manager.ANY_TENANT)
    return [found[i] for i in ids]


# -- aging ---------------------------------------------------------------------------------------

def test_the_rule_steps_once_per_step_waited_below_the_ceiling():
    assert aging.due_steps(31, aged=0, priority=1, step_s=30, ceiling=9)
    assert not aging.due_steps(29, aged=0, priority=1, step_s=30, ceiling=9)
    assert not aging.due_steps(59, aged=1, priority=2, step_s=30, ceiling=9)  # its second step is at 60 s
    assert aging.due_steps(61, aged=1, priority=2, step_s=30, ceiling=9)
    assert not aging.due_steps(10_000, aged=3, priority=9, step_s=30, ceiling=9)  # at the ceiling
    assert not aging.due_steps(10_000, aged=0, priority=5, step_s=30, ceiling=5)
    assert not aging.due_steps(10_000, aged=0, priority=1, step_s=0, ceiling=9)  # off


def test_bound_counts_steps_to_the_ceiling_and_the_pass_interval():
    s = Settings(aging_s=30, aging_ceiling=9, reconcile_interval_s=5)
    assert aging.bound_s(1, s) == 8 * 30 + 5
    assert aging.bound_s(9, s) == 0
    assert aging.bound_s(1, s, interval_s=60) == 8 * 60 + 60  # one step per pass at most


def test_age_queued_promotes_due_jobs_one_step_per_call(engine):
    due = make(engine, 3, waited_s=100)
    fresh = make(engine, 2, waited_s=0)
    promoted = manager.age_queued(engine, "minilm", step_s=30, ceiling=9)
    assert sorted(j.id for j in promoted) == sorted(due)
    assert [(j.priority, j.aged) for j in rows(engine, due)] == [(2, 1)] * 3
    assert [(j.priority, j.aged) for j in rows(engine, fresh)] == [(1, 0)] * 2
    assert all(j.dispatched_at is not None for j in rows(engine, due))  # its new message is its last send
    # waited 100 s: due for steps 1, 2 and 3, taken one call (one reconciler pass) at a time
    manager.age_queued(engine, "minilm", step_s=30, ceiling=9)
    manager.age_queued(engine, "minilm", step_s=30, ceiling=9)
    assert [(j.priority, j.aged) for j in rows(engine, due)] == [(4, 3)] * 3
    assert manager.age_queued(engine, "minilm", step_s=30, ceiling=9) == []  # step 4 is due at 120 s


def test_age_queued_stops_at_the_ceiling_and_leaves_the_rest_alone(engine):
    low = make(engine, waited_s=10_000)
    top = make(engine, waited_s=10_000, priority=6)
    other = make(engine, waited_s=10_000, model="other")
    later = make(engine, waited_s=10_000)
    with engine.begin() as conn:  # waiting out a retry backoff: not sent, not aged
        conn.execute(jobs.update().where(jobs.c.id == later[0]).values(
            run_after=manager.utcnow() + timedelta(hours=1)))
    running = make(engine, waited_s=10_000)
    manager.claim(engine, running, worker_id="w", device="cpu")
    for _ in range(12):
        manager.age_queued(engine, "minilm", step_s=1, ceiling=6)
    assert rows(engine, low)[0].priority == 6 and rows(engine, low)[0].aged == 5
    assert rows(engine, top)[0].priority == 6 and rows(engine, top)[0].aged == 0
    assert rows(engine, other)[0].priority == 1
    assert rows(engine, later)[0].priority == 1
    assert rows(engine, running)[0].priority == 1 and rows(engine, running)[0].status == JobStatus.RUNNING


def test_age_queued_takes_the_oldest_first_within_its_limit(engine):
    newer = make(engine, 3, waited_s=50)
    older = make(engine, 2, waited_s=90)
    promoted = manager.age_queued(engine, "minilm", step_s=30, ceiling=9, limit=2)
    assert sorted(j.id for j in promoted) == sorted(older)
    assert {j.priority for j in rows(engine, newer)} == {1}


def test_run_once_sends_the_promoted_jobs_at_their_new_priority(engine):
    ids = make(engine, 2, waited_s=100)
    d = InMemoryDispatcher()
    off = Settings(aging_s=0)
    assert aging.run_once(engine, d, off) == 0 and d.sent == []
    assert aging.run_once(engine, d, Settings(aging_s=30)) == 2
    assert sorted(job_id for _, job_id, _ in d.sent) == sorted(ids)
    assert {pri for _, _, pri in d.sent} == {broker_priority(2)}


def test_run_once_sends_the_promoted_jobs_as_a_bulk_submit_does(engine):
    """One message per up to the model's max_batch_size ids of one priority (minilm: 32), not one
    per job: a pass under a backlog promotes a thousand jobs a model."""
    ids = make(engine, 70, waited_s=100)
    d = InMemoryDispatcher()
    assert aging.run_once(engine, d, Settings(aging_s=30)) == 70
    assert sorted(i for m in d.messages for i in m) == sorted(ids)  # each promoted job once
    assert sorted(len(m) for m in d.messages) == [6, 32, 32]


def test_reconciler_dates_an_aged_jobs_old_message_by_its_queued_at(engine):
    (job_id,) = make(engine, waited_s=100)
    manager.age_queued(engine, "minilm", step_s=30, ceiling=9)
    job = rows(engine, [job_id])[0]
    old_list, new_list = queue_key("minilm", 1), queue_key("minilm", 2)
    assert _sent_at(job, new_list) == manager.as_utc(job.dispatched_at)
    # its message in the old list was sent before the promotion: queued_at is no later than that
    assert _sent_at(job, old_list) == manager.as_utc(job.queued_at) < manager.as_utc(job.dispatched_at)


# -- shares --------------------------------------------------------------------------------------

def test_weights_come_from_the_shares_table(tmp_path):
    path = tmp_path / "llmos.toml"
    path.write_text("[shares]\nacme = 3\nglobex = 1.5\n")
    assert shares.read_weights(path) == {"acme": 3.0, "globex": 1.5}
    assert shares.weights(Settings(config=path)) == {"acme": 3.0, "globex": 1.5}
    assert shares.read_weights(None) == {}
    for bad in ("acme = 0", "acme = -1", "acme = 'x'", "acme = true"):
        path.write_text(f"[shares]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[shares\] acme"):
            shares.read_weights(path)
    path.write_text("shares = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        shares.read_weights(path)


def test_the_step_down_rule():
    w = {"acme": 3.0, "globex": 1.0}
    both = frozenset({"acme", "globex"})
    # 80 % of the compute against an entitlement of 75 %: above; globex at 20 % of its 25 %: not
    use = shares.Usage({"acme": 80.0, "globex": 20.0}, both)
    assert shares.over_share("acme", use, w) and not shares.over_share("globex", use, w)
    use = shares.Usage({"acme": 70.0, "globex": 30.0}, both)
    assert not shares.over_share("acme", use, w) and shares.over_share("globex", use, w)
    # no contention: nobody else has queued work, whatever the past compute says
    alone = shares.Usage({"acme": 100.0, "globex": 1.0}, frozenset({"acme"}))
    assert not shares.over_share("acme", alone, w)
    # a tenant that left the model does not count; an unlisted tenant weighs 1
    use = shares.Usage({"acme": 50.0, "gone": 900.0, "initech": 50.0}, frozenset({"acme", "initech"}))
    assert shares.shares_of(use, w) == {"acme": (0.5, 0.75), "initech": (0.5, 0.25)}
    assert shares.over_share("initech", use, w) and not shares.over_share("acme", use, w)
    # the submitting tenant contends even with nothing queued yet
    assert shares.over_share("globex", shares.Usage({"acme": 1.0, "globex": 9.0}, frozenset({"acme"})), w)


def finished(engine, tenant, compute_ms, batch_size, *, model="minilm", ago_s=1.0):
    (job_id,) = make(engine, tenant=tenant, model=model)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(
            status=JobStatus.SUCCEEDED.value, compute_ms=compute_ms, batch_size=batch_size,
            finished_at=manager.utcnow() - timedelta(seconds=ago_s)))


def test_usage_sums_each_jobs_part_of_its_batch_over_the_window(engine):
    finished(engine, "acme", 800.0, 4)  # a batch of 4 that took 0.8 s: 0.2 s each
    finished(engine, "acme", 800.0, 4)
    finished(engine, "globex", 100.0, None)
    finished(engine, "globex", 5000.0, 1, ago_s=3600)  # before the window
    finished(engine, "acme", 5000.0, 1, model="other")  # another model
    make(engine, tenant="globex")  # queued
    make(engine, tenant="initech", model="other")
    use = shares.read_usage(engine, "minilm", window_s=300)
    assert use.compute_s == pytest.approx({"acme": 0.4, "globex": 0.1})
    assert use.queued == {"globex"}


def test_adjusted_priority_steps_down_a_tenant_over_its_share(engine, sqlite_settings, tmp_path):
    (tmp_path / "llmos.toml").write_text("[shares]\nacme = 3\nglobex = 1\n")  # the working directory's
    for _ in range(9):
        finished(engine, "acme", 100.0, 1)  # acme 90 % of the compute
    finished(engine, "globex", 100.0, 1)
    make(engine, tenant="acme")
    make(engine, tenant="globex")
    s = sqlite_settings
    assert shares.adjusted_priority(engine, s, "minilm", "acme", 5) == 4
    assert shares.adjusted_priority(engine, s, "minilm", "globex", 5) == 5
    assert shares.adjusted_priority(engine, s, "minilm", "acme", 0) == 0  # nothing below 0
    # cached: more globex compute is not read until the cache expires
    for _ in range(30):
        finished(engine, "globex", 100.0, 1)
    assert shares.adjusted_priority(engine, s, "minilm", "acme", 5) == 4
    shares.clear_cache()
    assert shares.adjusted_priority(engine, s, "minilm", "acme", 5) == 5
    assert shares.adjusted_priority(engine, s, "minilm", "globex", 5) == 4
    # no [shares] table: off, whatever the compute says
    (tmp_path / "llmos.toml").write_text("")
    shares.clear_cache()
    assert shares.adjusted_priority(engine, s, "minilm", "globex", 5) == 5


@pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")
def test_submit_queues_an_over_share_tenants_work_lower(engine, sqlite_settings, tmp_path):
    from llmos.sdk import Client
    from llmos import SentimentTask

    (tmp_path / "llmos.toml").write_text("[shares]\nacme = 3\nglobex = 1\n")
    for _ in range(9):
        finished(engine, "globex", 100.0, 1)
    make(engine, tenant="acme")
    with Client(sqlite_settings, dispatcher=InMemoryDispatcher()) as client:
        g = client.submit("minilm", [SentimentTask(text="hi")], priority=5, tenant="globex")
        a = client.submit("minilm", [SentimentTask(text="hi")], priority=5, tenant="acme")
    assert rows(engine, [g[0].id])[0].priority == 4
    assert rows(engine, [a[0].id])[0].priority == 5
