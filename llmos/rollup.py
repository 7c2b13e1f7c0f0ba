"""The rollup of finished jobs (and ended webhook deliveries): what `/metrics` counts, without reading
the task table's old rows.

A core module beside llmos.manager: it writes only its own tables (job_rollups, webhook_rollups,
job_rollup_watermark) and imports no other LLMOS module but llmos.db and llmos.jobs. manager
(`retry_failed` calls `keep_counted`), the reconciler, retention and the collector
(llmos.monitoring.metrics) import it.

`job_rollups` holds, per (UTC day of finished_at, model, task type, tenant, final status): the
jobs, their retries (attempts - 1), tokens in and out, and for each histogram (queue wait,
compute, end-to-end latency, batch size) the observations, their sum and the cumulative bucket
counts (`llmos.db.ROLLUP_HISTOGRAMS`). The one-row `job_rollup_watermark` says how far it goes:
every job with finished_at < `folded_to` is in it, and no other.

`webhook_rollups` holds, per (UTC day of the end, tenant, outcome delivered | given_up), the ended
webhook deliveries and their attempts, folded in the same transaction and range (by delivered_at
and given_up_at: a partial index each); pending deliveries are read live (few rows, a partial index).

`refresh` folds the jobs with finished_at in [folded_to, now - lag) with one
INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE and moves the watermark in the same
transaction (a range of the partial index ix_jobs_finished_at_id). Only one process folds at a
time: on Postgres the watermark row is taken FOR UPDATE SKIP LOCKED (a second caller finds it
locked and returns at once: the first is folding), on SQLite the transaction is BEGIN IMMEDIATE
(`llmos.db.begin_write`). A range is folded once: the watermark moves past it in the commit that
adds it. At most `MAX_STEP_S` of finished_at is folded per transaction (the first fold of a task
table of months folds it a day at a time).

`totals` answers rollup(< watermark) + the same aggregate over the tail (finished_at >= the
watermark), read in one snapshot, so the totals are exact at the scrape, the same from every API
process, and no count goes down when `llmos prune` deletes old jobs (`manager.prune` folds
first and deletes only jobs and deliveries that ended before the watermark), nor when an
operator retries a failed job (`keep_counted`: the counters count finishes).

The lag: finished_at is stamped inside the finishing transaction (Postgres `now()`, the
transaction's start; SQLite the writer's clock just before its write), so a job becomes visible
at its commit, a little after its finished_at. The fold stops at now - `LAG_S`; a finishing
transaction that commits more than `LAG_S` after its stamp (60 s: a finish, cancel or expiry is
one short statement, milliseconds; 60 s is far beyond any pause but a stalled server) would land
behind the watermark and never be counted. On Postgres the stamp is the start of a one-statement
transaction; the statement waits only for row locks of other short transactions. On SQLite the
stamp is taken before the write lock is waited for, and that wait ends within busy_timeout (30 s:
past it the finish fails and is retried with a new stamp), so 60 s covers it with room. (Measured
in tests/unit/test_monitoring.py: with folders in a tight loop, SQLite's busy handler let a writer
wait 17 s between stamp and commit; a lag of 1 s lost jobs there.) The cost of a larger lag is
only a longer tail to aggregate per scrape (the jobs of the last minute or so).

A transaction that stamps many rows with one `now()` may run longer than that
(`manager.end_queued_batch_jobs` ending a batch of 100,000 queued jobs, `manager.expire_overdue`
after an outage): on Postgres the fold's upper bound is also clamped to the start of the oldest
other open transaction of the database that has written (`pg_stat_activity.xact_start` where
`backend_xid` is set), so such a transaction's stamps are never behind the watermark at its
commit, however long it runs. pg_stat_activity shows `xact_start` only of the sessions of the
reader's own role (all to superusers and pg_read_all_stats): with LLMOS's processes on one role,
as one LLMOS_DATABASE_URL gives, they see each other; a writer under another role is covered
by the lag only. A long-open writing transaction delays the fold (a longer tail), never loses jobs.
"""

from __future__ import annotations

import dataclasses
import functools
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from llmos.db import (ROLLUP_HISTOGRAMS, as_utc, begin_write, job_rollup_watermark, job_rollups, jobs, rollup_bucket_column,
                      webhook_deliveries, webhook_rollups)
from llmos.jobs import FINAL_STATUSES

LAG_S = 60.0
"""The fold stops this far behind the database's clock (see the module doc)."""

MAX_STEP_S = 86_400.0
"""At most this much of finished_at is folded in one transaction."""

LABELS = ("model", "task_type", "tenant", "status")
"""The rollup's labels (beside its day)."""

SCALE = {"queue_wait": 1000.0, "compute": 1000.0, "latency": 1.0, "batch_size": 1.0}
"""Each histogram's source unit per reported unit (the task table keeps milliseconds)."""

VALUE_COLUMNS = tuple(c.name for c in job_rollups.c if not c.primary_key)
"""The additive columns of a rollup row (everything but its key)."""

WATERMARK_ID = 1


def _db_now(conn: sa.Connection) -> datetime:
    """The database's clock, as `llmos.manager.db_now` (not imported: manager imports this module)."""
    if conn.dialect.name == "sqlite":
        return datetime.now(timezone.utc)
    return conn.execute(sa.select(sa.func.now())).scalar_one().astimezone(timezone.utc)


def _day(dialect: str, column: Any = jobs.c.finished_at) -> Any:
    """The UTC day of a timestamp column, in SQL."""
    if dialect == "postgresql":
        return sa.cast(sa.func.timezone(sa.literal_column("'UTC'"), column), sa.Date)
    return sa.func.date(column)


def _latency_s(dialect: str) -> Any:
    """finished_at - created_at in seconds, in SQL."""
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", jobs.c.finished_at - jobs.c.created_at), sa.Float)
    # SQLite's date functions count milliseconds; rounded to them, so 1 s reads 1.0, not 1.00001
    days = sa.func.julianday(jobs.c.finished_at) - sa.func.julianday(jobs.c.created_at)
    return sa.func.round(days * sa.literal_column("86400.0"), 3)


def _sources(dialect: str) -> dict[str, Any]:
    """Each histogram's observed value per job, in its source unit (NULL: not observed)."""
    return {"queue_wait": jobs.c.queue_wait_ms, "compute": jobs.c.compute_ms,
            "latency": _latency_s(dialect), "batch_size": jobs.c.batch_size}


def _number(x: float) -> Any:
    return sa.literal_column(repr(float(x)))


@functools.lru_cache(maxsize=4)
def aggregates(dialect: str) -> tuple[Any, ...]:
    """The SELECT list of VALUE_COLUMNS over a group of finished jobs (labelled as the columns);
    built once per dialect (about 90 expressions: building them cost ~10 ms a statement)."""
    zero, one = sa.literal_column("0"), sa.literal_column("1")
    # the attempts of this finish: those since the last operator retry (`llmos.manager.retry_failed`),
    # whose earlier finish was counted with its own retries
    tries = jobs.c.attempts - sa.func.coalesce(jobs.c.attempts_at_retry, zero)
    out = [sa.func.count().label("jobs"),
           sa.func.coalesce(sa.func.sum(sa.case((tries > one, tries - one), else_=zero)), zero).label("retries"),
           sa.func.coalesce(sa.func.sum(jobs.c.tokens_in), zero).label("tokens_in"),
           sa.func.coalesce(sa.func.sum(jobs.c.tokens_out), zero).label("tokens_out")]
    for name, x in _sources(dialect).items():
        bounds, scale = ROLLUP_HISTOGRAMS[name], SCALE[name]
        out.append(sa.func.count(x).label(f"{name}_n"))
        value = x / _number(scale) if scale != 1.0 else x
        out.append(sa.func.coalesce(sa.func.sum(value), sa.literal_column("0.0")).label(f"{name}_sum"))
        # constants as literals: the statement stays one shape (and short) whatever the bounds
        out.extend(sa.func.sum(sa.case((x <= _number(bound * scale), one), else_=zero))
                   .label(rollup_bucket_column(name, i)) for i, bound in enumerate(bounds))
    assert tuple(c.name for c in out) == VALUE_COLUMNS, "aggregates() and job_rollups disagree"
    return tuple(out)


def _finished(since: datetime | None, until: datetime | None) -> list[Any]:
    """Finished jobs with finished_at in [since, until): a range of ix_jobs_finished_at_id."""
    cond = [jobs.c.finished_at.is_not(None)]
    if since is not None:
        cond.append(jobs.c.finished_at >= since)
    if until is not None:
        cond.append(jobs.c.finished_at < until)
    return cond


@dataclasses.dataclass(frozen=True)
class Refreshed:
    """What one `refresh` did."""

    jobs: int = 0  # finished jobs folded
    folded_to: datetime | None = None  # the watermark it left (None: it folded nothing, another held the lock)
    skipped: bool = False  # another process was folding (Postgres): nothing done here


def refresh(engine: sa.Engine, *, lag_s: float = LAG_S, max_step_s: float = MAX_STEP_S,
            now: datetime | None = None, wait: bool = False) -> Refreshed:
    """Fold the finished jobs not yet folded, up to the database's clock (or `now`) - `lag_s`.

    One transaction per `max_step_s` of finished_at, each moving the watermark with the rows it
    adds. Returns at once when another process holds the watermark (Postgres), unless `wait`:
    then it waits for that fold and goes on from where it ended (retention, which must not delete
    a job before it is folded)."""
    total, last = 0, None
    while True:
        step = _fold_step(engine, lag_s=lag_s, max_step_s=max_step_s, now=now, wait=wait)
        if step is None:
            return Refreshed(jobs=total, folded_to=last, skipped=last is None)
        n, last, more = step
        total += n
        if not more:
            return Refreshed(jobs=total, folded_to=last)


_OLDEST_WRITE = sa.text(
    "SELECT min(xact_start) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
    "AND datname = current_database()")


def _oldest_open_write(conn: sa.Connection) -> datetime | None:
    """Postgres: the start of the oldest other transaction of this database that has written and
    not yet committed (a finish stamps finished_at with its transaction's start, `now()`); None on
    SQLite or when there is none. pg_stat_activity shows `xact_start` of the sessions of the
    folder's own role (and of every role to superusers and members of pg_read_all_stats): LLMOS's
    processes share one database URL, so one role, and see each other's."""
    if conn.dialect.name != "postgresql":
        return None
    return as_utc(conn.execute(_OLDEST_WRITE).scalar())


def folded_to(conn: sa.Connection) -> datetime | None:
    """The watermark: every job finished (delivery ended) before it is in the rollup; None: none is."""
    wm = job_rollup_watermark
    return as_utc(conn.execute(sa.select(wm.c.folded_to).where(wm.c.id == WATERMARK_ID)).scalar())


def _lock_watermark(conn: sa.Connection, wait: bool) -> Any:
    """The watermark row, locked for this transaction; None when another transaction holds it
    (and not `wait`)."""
    wm = job_rollup_watermark
    q = sa.select(wm.c.folded_to).where(wm.c.id == WATERMARK_ID)
    pg = conn.dialect.name == "postgresql"
    row = conn.execute(q.with_for_update(skip_locked=not wait) if pg else q).first()
    if row is not None:
        return row
    if conn.execute(q).first() is not None:  # it exists: another transaction has it (Postgres)
        return None
    insert = (postgresql.insert(wm) if pg else sqlite.insert(wm)).values(id=WATERMARK_ID)
    conn.execute(insert.on_conflict_do_nothing())  # (a database made without the migration's row)
    return conn.execute(q.with_for_update() if pg else q).first()


def _fold_step(engine: sa.Engine, *, lag_s: float, max_step_s: float,
               now: datetime | None, wait: bool) -> tuple[int, datetime, bool] | None:
    wm = job_rollup_watermark
    with begin_write(engine) as conn:
        row = _lock_watermark(conn, wait)
        if row is None:
            return None
        clock = _db_now(conn)
        upper = (as_utc(now) if now is not None else clock) - timedelta(seconds=lag_s)
        oldest = _oldest_open_write(conn)
        if oldest is not None:  # a long finishing transaction still open: its stamps are >= its start
            upper = min(upper, oldest)
        lo = as_utc(row.folded_to)
        if lo is None:  # never folded: from the oldest finished job or ended delivery (first index entries)
            lo = _first_end(conn, default=upper)
        if upper <= lo:
            if row.folded_to is None:
                conn.execute(wm.update().where(wm.c.id == WATERMARK_ID).values(folded_to=lo, refreshed_at=clock))
            return 0, lo, False
        hi = min(upper, lo + timedelta(seconds=max_step_s))
        _add_jobs(conn, _finished(lo, hi))
        # the jobs folded: their count by the rows' own sum would need another read; the range's
        # count is one index-only count over the range just folded
        n = conn.execute(sa.select(sa.func.count()).where(*_finished(lo, hi))).scalar_one()
        _fold_webhooks(conn, lo, hi)
        conn.execute(wm.update().where(wm.c.id == WATERMARK_ID).values(folded_to=hi, refreshed_at=clock))
        return int(n), hi, hi < upper


def _first_end(conn: sa.Connection, default: datetime) -> datetime:
    """The oldest finished_at or end of a delivery (the first entries of their indexes), else `default`."""
    firsts = [as_utc(conn.execute(sa.select(sa.func.min(c)).where(c.is_not(None))).scalar())
              for c in (jobs.c.finished_at, *_ENDED.values())]
    return min((t for t in firsts if t is not None), default=default)


def _add_jobs(conn: sa.Connection, where: list[Any]) -> None:
    """Add the finished jobs matching `where` to job_rollups (one INSERT ... SELECT ... ON CONFLICT)."""
    dialect = conn.dialect.name
    select = (sa.select(_day(dialect).label("day"), *[jobs.c[c] for c in LABELS], *aggregates(dialect))
              .where(*where)
              .group_by(_day(dialect), *[jobs.c[c] for c in LABELS]))
    insert = (postgresql.insert(job_rollups) if dialect == "postgresql" else sqlite.insert(job_rollups))
    insert = insert.from_select(["day", *LABELS, *VALUE_COLUMNS], select)
    insert = insert.on_conflict_do_update(
        index_elements=["day", *LABELS],
        set_={c: job_rollups.c[c] + insert.excluded[c] for c in VALUE_COLUMNS})
    conn.execute(insert)


def keep_counted(conn: sa.Connection, job_where: list[Any], delivery_where: list[Any] | None = None) -> None:
    """Before a finish is undone (`llmos.manager.retry_failed` re-queues a failed job, re-arms its
    webhook): add the rows' current contribution to the rollup when they are still in the tail, so
    that the counters keep counting that finish (and that delivery) and never go down.

    Call first in the transaction that clears finished_at (delivered_at, given_up_at), with the
    conditions that select the rows it will change. It takes the watermark row FOR UPDATE on
    Postgres (waiting for a fold in progress; a fold meanwhile skips it and runs on the next call),
    so no fold reads the rows between this and the commit; on SQLite the caller's write
    transaction (`begin_write`) already excludes the folder. Rows finished before the watermark
    were folded already and are left as they are. A watermark never set is set first (to the
    oldest end, or now - LAG_S if earlier: nothing is below it), since totals read the rollup only
    with a watermark."""
    row = _lock_watermark(conn, wait=True)
    folded_to = as_utc(row.folded_to)
    if folded_to is None:
        folded_to = _first_end(conn, default=_db_now(conn) - timedelta(seconds=LAG_S))
        folded_to = min(folded_to, _db_now(conn) - timedelta(seconds=LAG_S))
        wm = job_rollup_watermark
        conn.execute(wm.update().where(wm.c.id == WATERMARK_ID).values(folded_to=folded_to))
    _add_jobs(conn, [*job_where, *_finished(folded_to, None)])
    if delivery_where:
        _add_webhooks(conn, delivery_where, folded_to)


_ENDED = {"delivered": webhook_deliveries.c.delivered_at, "given_up": webhook_deliveries.c.given_up_at}
"""Each end of a delivery and its time column (a partial index each: ix_webhook_deliveries_<column>)."""


def _ended_in(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
    cond = [column.is_not(None)]
    if since is not None:
        cond.append(column >= since)
    if until is not None:
        cond.append(column < until)
    return cond


def _fold_webhooks(conn: sa.Connection, lo: datetime, hi: datetime) -> None:
    """Deliveries that ended (delivered or given up) in [lo, hi) into webhook_rollups."""
    _add_webhooks(conn, [], lo, hi)


def _add_webhooks(conn: sa.Connection, where: list[Any], lo: datetime, hi: datetime | None = None) -> None:
    """Deliveries matching `where` that ended in [lo, hi) into webhook_rollups."""
    d, dialect = webhook_deliveries, conn.dialect.name
    for outcome, column in _ENDED.items():
        day = _day(dialect, column)
        select = (sa.select(day.label("day"), d.c.tenant, sa.literal_column(f"'{outcome}'"), sa.func.count(),
                            sa.func.coalesce(sa.func.sum(d.c.attempts), sa.literal_column("0")))
                  .where(*where, *_ended_in(column, lo, hi)).group_by(day, d.c.tenant))
        insert = postgresql.insert(webhook_rollups) if dialect == "postgresql" else sqlite.insert(webhook_rollups)
        insert = insert.from_select(["day", "tenant", "outcome", "deliveries", "attempts"], select)
        conn.execute(insert.on_conflict_do_update(
            index_elements=["day", "tenant", "outcome"],
            set_={c: webhook_rollups.c[c] + insert.excluded[c] for c in ("deliveries", "attempts")}))


@dataclasses.dataclass(frozen=True)
class Webhooks:
    """One tenant's webhook deliveries: ended ones (rollup + tail) and those still pending (live)."""

    delivered: int = 0
    given_up: int = 0
    ended_attempts: int = 0  # attempts of the delivered and given-up deliveries
    pending: int = 0
    pending_attempts: int = 0  # failed attempts so far of the pending ones

    @property
    def failures(self) -> int:
        """Failed POSTs: every attempt but the one that delivered."""
        return self.ended_attempts + self.pending_attempts - self.delivered


def webhook_totals(conn: sa.Connection, folded_to: datetime | None) -> dict[str, Webhooks]:
    """Per tenant: webhook_rollups (ended before `folded_to`) + the ended deliveries at or after it
    (ix_webhook_deliveries_delivered_at / _given_up_at) + the pending ones (the partial index
    ix_webhook_deliveries_next_attempt_at, over exactly the pending rows)."""
    d, r = webhook_deliveries, webhook_rollups
    acc: dict[str, dict[str, int]] = {}

    def add(tenant: str, **values: int) -> None:
        into = acc.setdefault(tenant, dict.fromkeys(("delivered", "given_up", "ended_attempts", "pending",
                                                     "pending_attempts"), 0))
        for k, v in values.items():
            into[k] += int(v or 0)

    if folded_to is not None:
        q = sa.select(r.c.tenant, r.c.outcome, sa.func.sum(r.c.deliveries), sa.func.sum(r.c.attempts)).group_by(
            r.c.tenant, r.c.outcome)
        for tenant, outcome, n, attempts in conn.execute(q):
            add(tenant, **{outcome: n, "ended_attempts": attempts})
    for outcome, column in _ENDED.items():
        q = (sa.select(d.c.tenant, sa.func.count(), sa.func.sum(d.c.attempts))
             .where(*_ended_in(column, folded_to, None)).group_by(d.c.tenant))
        for tenant, n, attempts in conn.execute(q):
            add(tenant, **{outcome: n, "ended_attempts": attempts})
    q = (sa.select(d.c.tenant, sa.func.count(), sa.func.sum(d.c.attempts))
         .where(d.c.delivered_at.is_(None), d.c.given_up_at.is_(None)).group_by(d.c.tenant))
    for tenant, n, attempts in conn.execute(q):
        add(tenant, pending=n, pending_attempts=attempts)
    return {t: Webhooks(**v) for t, v in acc.items()}


Key = tuple[str, str, str, str]
"""(model, task_type, tenant, status)."""


@dataclasses.dataclass(frozen=True)
class Totals:
    """Every finished job's totals per Key (VALUE_COLUMNS → number), and the watermark they used."""

    by_key: dict[Key, dict[str, float]]
    folded_to: datetime | None
    tail_jobs: int  # of them, jobs read live from the tail (finished_at >= folded_to)
    webhooks: dict[str, Webhooks] = dataclasses.field(default_factory=dict)  # per tenant


@functools.lru_cache(maxsize=1)
def _rollup_sums() -> sa.Select:
    """The rollup's sums per label set (every day): a read of the whole (small) table."""
    labels = [job_rollups.c[c] for c in LABELS]
    return sa.select(*labels, *[sa.func.sum(job_rollups.c[c]).label(c) for c in VALUE_COLUMNS]).group_by(*labels)


def totals(conn: sa.Connection) -> Totals:
    """rollup(< watermark) + the live aggregate of finished_at >= watermark, per Key.

    Call inside one snapshot (`snapshot`), so a fold committing meanwhile is seen either wholly
    or not at all (it moves rows from the tail into the rollup in one commit)."""
    dialect = conn.dialect.name
    wm = job_rollup_watermark
    folded_to = as_utc(conn.execute(sa.select(wm.c.folded_to).where(wm.c.id == WATERMARK_ID)).scalar())
    out: dict[Key, dict[str, float]] = {}
    if folded_to is not None:
        for r in conn.execute(_rollup_sums()):
            out[tuple(r[:4])] = {c: float(v or 0) for c, v in zip(VALUE_COLUMNS, r[4:])}
    tail_q = (sa.select(*[jobs.c[c] for c in LABELS], *aggregates(dialect))
              .where(*_finished(folded_to, None))
              .group_by(*[jobs.c[c] for c in LABELS]))
    tail = 0
    for r in conn.execute(tail_q):
        key = tuple(r[:4])
        values = {c: float(v or 0) for c, v in zip(VALUE_COLUMNS, r[4:])}
        tail += int(values["jobs"])
        into = out.setdefault(key, dict.fromkeys(VALUE_COLUMNS, 0.0))
        for c, v in values.items():
            into[c] += v
    return Totals(by_key={k: v for k, v in out.items() if k[3] in FINAL_STATUSES}, folded_to=folded_to,
                  tail_jobs=tail, webhooks=webhook_totals(conn, folded_to))


def snapshot(engine: sa.Engine) -> sa.Connection:
    """A connection whose transaction reads one snapshot (Postgres: REPEATABLE READ; SQLite: a
    deferred read transaction in WAL mode is one already). Use as `with snapshot(e) as c, c.begin():`."""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    return conn
