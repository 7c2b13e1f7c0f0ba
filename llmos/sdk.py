"""The Python SDK: `load_model(name)`, then `execute`, `submit` or `submit_many` tasks.

The SDK talks to the same database and Redis as the workers. Submitting validates the task
against the model's registry entry, writes the job row (`queued`), then sends its id to the
model's queue at its priority. Waiting listens to completion notices (one subscription per
client, `llmos.notify.DoneListener`) and reads the table.
"""

from __future__ import annotations

import collections.abc
import itertools
import logging
import math
import os
import threading
import time
import urllib.parse
import uuid
import warnings
import weakref
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import redis
import sqlalchemy as sa

from llmos import manager
from llmos.constants import (CANCEL_CHANNEL, DEFAULT_TENANT, MAX_ATTEMPTS, MAX_BATCH_ID_CHARS,
                             MAX_DEADLINE_S, MAX_IDEMPOTENCY_KEY_CHARS, MAX_JOBS_PER_SUBMIT,
                             MAX_TENANT_CHARS, WAIT_MAX_POLL_S, WAIT_POLL_S)
from llmos.db import MAX_WEBHOOK_URL_CHARS, UNSTORABLE, check_database, first_line, get_engine
from llmos.dispatch import CeleryDispatcher, Dispatcher
from llmos.errors import (DatabaseUnavailableError, JobFailedError, JobNotFoundError,
                          JobStateError, JobTimeoutError, LLMOSError, NoWorkerError, NoWorkerWarning,
                          ValidationError)
from llmos.jobs import Job, JobStatus
from llmos.logs import event
from llmos.notify import READY_WAIT_S, DoneListener, ping, publish_done, redis_client
from llmos.priority import parse_priority
from llmos.registry import ModelSpec, Registry
from llmos.scheduling import eta, shares
from llmos.settings import Settings, get_settings, redact
from llmos.tasks import (DialogueTask, Task, TaskResult, TranslationTask, ensure_task,
                         task_class)


log = logging.getLogger("llmos.sdk")


class Client:
    """A connection to one LLMOS deployment (database + Redis), from settings."""

    def __init__(self, settings: Settings | None = None, *, tenant: str | None = None,
                 dispatcher: Dispatcher | None = None, redis_conn: redis.Redis | None = None,
                 registry: Registry | None = None) -> None:
        self.settings = settings or get_settings()
        # every read and write of this client is scoped by its tenant
        self.tenant = DEFAULT_TENANT if tenant is None else _name("tenant", tenant, MAX_TENANT_CHARS)
        self.registry = registry or Registry.load(self.settings)
        self._dispatcher = dispatcher
        self._redis = redis_conn
        self._redis_made = False  # whether self._redis is ours (made from the settings)
        self._listener: DoneListener | None = None
        self._checked_db = False
        self._lock = threading.Lock()

    # -- connections -------------------------------------------------------------------------
    @property
    def engine(self) -> sa.Engine:
        engine = get_engine(self.settings.db_url)
        if not self._checked_db:
            check_database(self.settings.db_url)
            self._checked_db = True
        return engine

    @property
    def dispatcher(self) -> Dispatcher:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = CeleryDispatcher(self.settings)
            return self._dispatcher

    @property
    def redis(self) -> redis.Redis:
        with self._lock:
            if self._redis is None:
                self._redis = redis_client(self.settings)
                self._redis_made = True
            return self._redis

    def _notices(self, wait_s: float = READY_WAIT_S) -> DoneListener:
        """This client's notice listener, started; subscribed if Redis answered within `wait_s`.

        One per client (per process: a forked child starts its own), on its own connection that
        does not retry on its own: a broken subscription is seen, and redone, by the listener.
        """
        listener = self._listener
        if listener is None or listener.pid != os.getpid() or listener.closed:
            with self._lock:
                listener = self._listener
                if listener is None or listener.pid != os.getpid() or listener.closed:
                    given = self._redis is not None and not self._redis_made
                    conn = self._redis if given else redis_client(self.settings, retries=False)
                    listener = self._listener = DoneListener(conn)
        return listener.start(wait_s)

    def _uses_redis(self) -> bool:
        """Whether submits go through Redis here (Celery), or a Redis client was given."""
        return (self._dispatcher is None or isinstance(self._dispatcher, CeleryDispatcher)
                or (self._redis is not None and not self._redis_made))

    def _listen_before_insert(self) -> int | None:
        """The listener's epoch if it is subscribed now (jobs inserted next need no status read)."""
        if not self._uses_redis():
            return None  # waits start the listener
        listener = self._notices()
        with listener.cond:
            return listener.state()

    def _handles(self, created: list[tuple[Job, bool]], tenant: str, epoch: int | None) -> list["JobHandle"]:
        """Handles of one submit, sharing one group; new jobs remembered by the listener."""
        group = _Group(tenant, [job.id for job, _ in created])
        new_ids = [job.id for job, is_new in created if is_new]
        listener = self._listener
        if epoch is not None and listener is not None and new_ids:
            listener.track(new_ids, epoch, tenant)
            weakref.finalize(group, listener.forget_later, new_ids).atexit = False  # handles gone: forget them
        return [JobHandle(self, job.id, job.model, job.task_type, tenant, group=group,
                          eta_start_at=job.eta_start_at, eta_finish_at=job.eta_finish_at) for job, _ in created]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self._redis is not None:
            self._redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- models ------------------------------------------------------------------------------
    def load_model(self, name: str) -> "Model":
        return Model(self, self.registry.get(name))

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, model: str, tasks: Iterable[Task], *, priority: int | str | None = None,
               idempotency_key: str | Sequence[str | None] | None = None,
               tenant: str | None = None, batch_id: str | None = None,
               timeout_s: float | None = None, deadline: datetime | float | None = None,
               max_attempts: int = 3, webhook_url: str | None = None,
               before_send: Callable[[list[Job]], None] | None = None) -> list["JobHandle"]:
        """Validate, write and send `tasks` for `model`; one handle per task, in order.

        `timeout_s`: longest a job may run (then it fails with reason timeout); `deadline`: a
        time (or seconds from now) after which a job that has not started is `expired`;
        `max_attempts`: runs before a job whose worker keeps dying is failed; `webhook_url`: an
        http(s) URL an API process POSTs the final job to (one task without a batch id), else
        the final batch (several tasks get a new batch id if none is given). Every argument is
        checked first: a ValidationError means nothing was written or sent. If no live worker
        serves `model`, a NoWorkerWarning says how to start one (the jobs wait queued).
        `before_send`: called with the jobs once they are written, before any is sent to a
        worker (the API subscribes to their token streams there).
        """
        return self._submit(model, tasks, priority=priority, idempotency_key=idempotency_key,
                            tenant=tenant, batch_id=batch_id, timeout_s=timeout_s,
                            deadline=deadline, max_attempts=max_attempts, warn=True,
                            webhook_url=webhook_url, before_send=before_send)[0]

    def _submit(self, model: str, tasks: Iterable[Task], *, priority: int | str | None,
                idempotency_key: str | Sequence[str | None] | None, tenant: str | None,
                batch_id: str | None, timeout_s: float | None, deadline: datetime | float | None,
                max_attempts: int, warn: bool, webhook_url: str | None = None,
                before_send: Callable[[list[Job]], None] | None = None) -> tuple[list["JobHandle"], bool]:
        """`submit` (`warn`: a NoWorkerWarning if no worker serves the model), and whether one does."""
        spec = self.registry.get(model)
        tasks = _task_list(tasks)
        prio = parse_priority(priority)
        tenant = self._tenant(tenant)
        keys = _keys(idempotency_key, len(tasks))
        batch_id = _name("batch_id", batch_id, MAX_BATCH_ID_CHARS)
        webhook_url = webhook_url_of(webhook_url)
        if webhook_url is not None and batch_id is None and len(tasks) > 1:
            batch_id = uuid.uuid4().hex  # one webhook for the whole submit, as POST /v1/jobs:batch sends
        timeout_s = _timeout(timeout_s, self.settings.max_job_seconds)
        deadline, deadline_in_s = _deadline(deadline)
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) \
                or not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise ValidationError(f"max_attempts must be an integer 1–{MAX_ATTEMPTS}, got {max_attempts!r}")
        checked = [validate_for(spec, t, _conversation_for(tenant, k)) for t, k in zip(tasks, keys)]
        if not checked:
            return [], False
        if self._dispatcher is None or isinstance(self._dispatcher, CeleryDispatcher):
            ping(self.redis, self.settings)  # Redis down: fail before any read or write
        # tenant shares (llmos.scheduling.shares, only with [shares] in llmos.toml): a tenant over its
        # share of the model's compute queues one step lower; the ETA below counts that priority
        prio = self._db(shares.adjusted_priority, self.settings, spec.name, tenant, prio) if shares.weights(self.settings) else prio
        # ETA and admission (llmos.scheduling.eta): one read per submit call; refuses a model that
        # fits on no device, and a deadline the measured ETA cannot meet, before anything is written
        admission = eta.admit(self.engine, spec, priority=prio, n=len(checked), deadline=deadline,
                              deadline_in_s=deadline_in_s, mode=self.settings.deadline_admission,
                              dead_after_s=self.settings.dead_after_s,
                              redis_conn=self.redis if self._uses_redis() else None, settings=self.settings)
        new = [manager.NewJob(model=spec.name, task_type=t.task_type, input=t.model_dump(mode="json"),
                              priority=prio, tenant=tenant, idempotency_key=k,
                              batch_id=batch_id, conversation_id=getattr(t, "conversation_id", None),
                              timeout_s=timeout_s, deadline=deadline, deadline_in_s=deadline_in_s,
                              max_attempts=max_attempts, eta_start_in_s=admission.start_in_s(i),
                              eta_finish_in_s=admission.finish_in_s(i))
               for i, (t, k) in enumerate(zip(checked, keys))]
        epoch = self._listen_before_insert()  # subscribed first: no notice of these jobs is missed
        created = self._db(manager.create_jobs, new, webhook_url=webhook_url)
        handles = self._handles(created, tenant, epoch)
        to_send = [job for job, is_new in created if is_new]
        if before_send is not None:
            before_send([job for job, _ in created])
        try:
            # a bulk submit: one message per batch of jobs; a single job: one message of its own
            self.dispatcher.send(to_send, chunk=spec.max_batch_size if len(new) > 1 else 1)
        except LLMOSError as exc:
            # The rows are written: the jobs are accepted. The reconciler sends them once Redis
            # answers again (their ids are not in the pending set), so the caller keeps handles.
            event(log, "send_deferred", logging.WARNING, jobs=len(to_send), error=str(exc))
        served = self.has_worker(spec.name)  # one indexed query per submit call
        if not served:
            event(log, "no_worker", model=spec.name, jobs=len(created))
            if warn:
                warnings.warn(no_worker_message(spec.name), NoWorkerWarning, stacklevel=4)
        return handles, served

    def has_worker(self, model: str) -> bool:
        """Whether a worker that heartbeated within LLMOS_DEAD_AFTER_S serves `model`."""
        return bool(self._db(manager.live_workers, model, within_s=self.settings.dead_after_s))

    def _tenant(self, tenant: str | None) -> str:
        """The tenant a call acts for: the one given, else this client's."""
        return self.tenant if tenant is None else _name("tenant", tenant, MAX_TENANT_CHARS)

    def job(self, job_id: str, *, tenant: str | None = None) -> Job:
        """One of the tenant's jobs (JobNotFoundError for another tenant's id, as for none)."""
        job_id = _job_id(job_id)
        job = self._db(manager.get_job, job_id, tenant=self._tenant(tenant))
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return job

    def wait(self, job_ids: Sequence[str], timeout: float | None = None, *,
             tenant: str | None = None) -> dict[str, Job]:
        """Wait until every job is final (or `timeout` passes); returns every job as last read.

        Reads stay O(N) for N jobs: a job's full row is read once, when a notice announces it
        (or a status poll finds it) final; statuses are read only for jobs whose notice may have
        been missed (not submitted by this client while its listener was subscribed, or the
        subscription broke since), and by the fallback poll. Each read is one transaction.
        """
        tenant = self._tenant(tenant)
        _check_wait_timeout(timeout)
        ids = list(dict.fromkeys(_job_id(j) for j in job_ids))
        return self._wait(ids, timeout, tenant)

    def _wait(self, ids: list[str], timeout: float | None, tenant: str, group: "_Group | None" = None,
              full: bool = True) -> dict[str, Any]:
        """`wait` on canonical ids: Jobs, or with `full=False` `manager.JobOutcome`s (the columns a result needs).

        With `group` (outcomes only), the announced unread siblings are read along and kept there.
        """
        latest: dict[str, Any] = {}
        remaining = set(ids)
        if not remaining:
            return latest
        read = self._read_jobs if full else self._read_outcomes
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self._notices()
        cond = listener.cond
        with cond:
            listener._drain_forgotten()
            listener.watch(remaining)  # before any read: a notice from now on is kept
            seen = listener.state()
            covered = listener.covered(remaining, tenant)

        def keep(rows: dict[str, Any], wanted: Iterable[str]) -> None:
            """The final ones of `rows` (read for `wanted`): this wait's, or kept on the group."""
            mine, others, stale = [], [], []
            for job_id in wanted:
                row = rows.get(job_id)
                if row is None or not row.status.is_final:
                    stale.append(job_id)
                elif job_id in remaining:
                    latest[job_id] = row
                    remaining.discard(job_id)
                    mine.append(job_id)
                else:
                    group.rows[job_id] = row  # type: ignore[union-attr]
                    others.append(job_id)
            with cond:
                listener.unwatch(mine)
                listener.collected(mine)
                listener.collected(others)
                listener.announced.difference_update(stale)  # announced, yet not final here: not again
                if group is not None:
                    group.unread.difference_update(mine)
                    group.unread.difference_update(others)

        def poll(first: bool = False) -> None:
            """Every pending job read once (statuses, then the final ones' full rows; or outcomes).

            In a group's wait, a job found final by a later poll had its notice lost (a worker's
            publish failed): the group's other unread jobs may have lost theirs too, so they are
            read as well and the final ones kept for their handles (else each of them would wait
            out a poll interval in turn).
            """
            pending = sorted(remaining)
            if full:
                statuses = self._db(manager.job_statuses, pending, tenant=tenant)
                found = set(statuses)
            else:
                rows = self._read_outcomes(pending, tenant)
                found = set(rows)
            missing = remaining - found
            if missing:
                raise JobNotFoundError(f"no job with id {sorted(missing)[0]!r}")
            if full:
                final = {i for i, s in statuses.items() if s.is_final}
                if final:
                    keep(self._read_jobs(sorted(final), tenant), final)
            else:
                final = {i for i, o in rows.items() if o.status.is_final}
                keep(rows, final)
            if final and group is not None and not first:
                with cond:
                    others = group.unread - remaining - listener.announced
                if others:
                    more = self._read_outcomes(sorted(others), tenant)
                    keep(more, [i for i, o in more.items() if o.status.is_final])

        try:
            if len(covered) < len(remaining):  # a notice of the others may have gone before the watch
                poll(first=True)
            interval = WAIT_POLL_S
            poll_at = time.monotonic() + interval
            while remaining:
                ready = siblings = None
                with cond:
                    while True:
                        now = time.monotonic()
                        if deadline is not None and now >= deadline:
                            break
                        ready, siblings = _announced(listener, remaining, group)
                        state = listener.state()
                        if ready or state != seen or now >= poll_at:
                            break
                        cond.wait((poll_at if deadline is None else min(poll_at, deadline)) - now)
                if ready:
                    wanted = ready | siblings
                    keep(read(sorted(wanted), tenant), wanted)
                    poll_at = time.monotonic() + interval  # notices flow: no need to poll yet
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if state != seen:  # subscribed again (a notice of the gap may be lost), or down
                    seen, interval = state, WAIT_POLL_S
                    if state is not None:
                        poll()
                        poll_at = time.monotonic() + interval
                    continue
                poll()  # quiet for `interval`: a lost notice is caught here
                if seen is not None:
                    interval = min(interval * 2, WAIT_MAX_POLL_S)
                poll_at = time.monotonic() + interval
        finally:
            with cond:
                listener.unwatch(remaining)
        if remaining:  # timed out: the rest as they are now
            latest.update(read(sorted(remaining), tenant))
        return latest

    def _read_jobs(self, ids: list[str], tenant: str) -> dict[str, Job]:
        return self._db(manager.get_jobs, ids, tenant=tenant)

    def _read_outcomes(self, ids: list[str], tenant: str) -> dict[str, "manager.JobOutcome"]:
        """Status, result and error of `tenant`'s jobs by id (`manager.job_outcomes`)."""
        return self._db(manager.job_outcomes, ids, tenant=tenant)

    def _results(self, handles: Sequence["JobHandle"], timeout: float | None) -> list[TaskResult]:
        """`Model.results` for this client's handles: outcomes only, rows read ahead used first."""
        _check_wait_timeout(timeout)
        until = None if timeout is None else time.monotonic() + timeout
        by_tenant: dict[str, dict[str, None]] = {}
        got: dict[str, Any] = {}
        ids = []
        for h in handles:
            group = getattr(h, "_group", None)
            job_id = h.id if group is not None else _job_id(h.id)  # a submit's ids are canonical
            ids.append(job_id)
            row = group.rows.pop(job_id, None) if group is not None and group.tenant == h.tenant else None
            if row is not None:  # read ahead by a sibling's result()
                got[job_id] = row
            elif job_id not in got:
                by_tenant.setdefault(h.tenant, {})[job_id] = None
        for tenant, wanted in by_tenant.items():  # one wait, unless the handles span tenants
            left = None if until is None else max(0.0, until - time.monotonic())
            got.update(self._wait(list(wanted), left, tenant, full=False))
        out = []
        for h, job_id in zip(handles, ids):
            row = got.get(job_id)
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            out.append(_result_of(row, h.task_type, timeout))
        return out

    def _result(self, handle: "JobHandle", timeout: float | None) -> TaskResult:
        """`handle.result()` for a handle of one of this client's submits (see `_Group`)."""
        _check_wait_timeout(timeout)
        group = handle._group
        row = group.rows.pop(handle.id, None) if group is not None else None
        if row is None:
            same = group if group is not None and group.tenant == handle.tenant else None
            row = self._wait([handle.id], timeout, handle.tenant, same, full=False).get(handle.id)
            if group is not None:
                group.rows.pop(handle.id, None)  # read along by another thread's wait meanwhile
            if row is None:
                raise JobNotFoundError(f"no job with id {handle.id!r}")
        return _result_of(row, handle.task_type, timeout)

    def cancel(self, job_id: str, *, tenant: str | None = None) -> bool:
        """Cancel a queued or running job; a running one's worker stops it between steps."""
        tenant = self._tenant(tenant)
        job_id = _job_id(job_id)
        if self._db(manager.get_job, job_id, tenant=tenant) is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        done = self._db(manager.cancel, job_id, tenant=tenant)
        if done:
            try:
                self.redis.publish(CANCEL_CHANNEL, str(job_id))
                publish_done(self.redis, [str(job_id)])
            except (redis.exceptions.RedisError, LLMOSError):
                pass  # the table says cancelled; a running job then just finishes unrecorded
        return done

    def retry(self, job_id: str, *, tenant: str | None = None) -> Job:
        """Run a failed job again (failed → queued, sent to its model's queue); its row as re-queued.

        JobNotFoundError for no such job of the tenant; JobStateError when it is not failed, or
        its deadline has passed. The retry gets the job's attempt budget again (`manager.retry_failed`).
        Redis down after the row is re-queued does not undo the retry (as for a submit): the job
        is returned queued, a warning is logged, and the reconciler sends it once Redis answers.
        """
        tenant = self._tenant(tenant)
        job_id = _job_id(job_id)
        job = self._db(manager.retry_failed, job_id, tenant=tenant)
        if job is None:
            now = self._db(manager.get_job, job_id, tenant=tenant)
            if now is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            why = ("its deadline has passed" if now.status == JobStatus.FAILED
                   else f"it is {now.status.value}; only a failed job can be retried")
            raise JobStateError(f"job {job_id} cannot be retried: {why}", status=now.status.value)
        event(log, "job_retry", job_id=job.id, tenant=tenant, model=job.model)
        try:
            self.dispatcher.send([job])
        except LLMOSError as exc:
            # As in submit: the UPDATE has committed, so the retry stands (a second call would be a
            # 409). The job is queued; the reconciler sends it once Redis answers again.
            event(log, "send_deferred", logging.WARNING, jobs=1, job_id=job.id, error=str(exc))
        return job

    def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self.engine, *args, **kwargs)
        except sa.exc.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot reach the database at {redact(self.settings.db_url)}: "
                f"{first_line(exc.orig or exc)}"
            ) from None


def _check_wait_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):  # `not >=`: NaN too
        raise ValidationError(f"timeout must be a number of seconds (0 or more) or None, got {timeout!r}")


class _Group:
    """What the handles of one submit share: the ids not yet read final, and outcomes read ahead.

    When one handle's `result()` finds its job announced, the outcomes of every announced
    sibling not yet read come in the same query and wait in `rows` until their own handle asks
    (popped then; `Model.results` takes them too): waiting on handles in turn costs about one
    query per recorded batch. `rows` holds at most the submit's jobs read but not yet asked for.
    """

    __slots__ = ("tenant", "unread", "rows", "__weakref__")

    def __init__(self, tenant: str, ids: Iterable[str]) -> None:
        self.tenant = tenant
        self.unread = set(ids)
        self.rows: dict[str, manager.JobOutcome] = {}


def _announced(listener: DoneListener, remaining: set[str],
               group: _Group | None) -> tuple[set[str], set[str]]:
    """(announced ids among `remaining`, announced unread siblings in `group`); caller holds the lock."""
    ann = listener.announced
    if not ann:
        return set(), set()
    if len(ann) <= len(remaining):
        ready = {i for i in ann if i in remaining}
    else:
        ready = {i for i in remaining if i in ann}
    siblings: set[str] = set()
    if ready and group is not None:
        unread = group.unread
        siblings = {i for i in ann if i in unread and i not in remaining}
    return ready, siblings


def no_worker_message(model: str) -> str:
    """What to do when no live worker serves `model`."""
    return (f"no live worker serves model {model!r}; start one with `llmos worker --model {model}` "
            f"(or `llmos up -m {model}`)")


def _job_id(value: Any) -> str:
    """A job id in canonical form; anything that is not a UUID cannot name a job."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise JobNotFoundError(f"no job with id {value!r} (job ids are UUIDs)") from None


def validate_for(spec: ModelSpec, task: Any, conversation_id: str | None = None) -> Task:
    """Check a task against a model's entry: task type served, input within limits.

    A dialogue task without a conversation starts one: `conversation_id` if given, else a new id.
    """
    task = ensure_task(task)
    spec.require_task(task.task_type)
    spec.require_configured()
    if isinstance(task, TranslationTask):
        spec.require_language_pair(task.source_lang, task.target_lang)
    if isinstance(task, DialogueTask) and task.conversation_id is None:
        task = task.model_copy(update={"conversation_id": conversation_id or uuid.uuid4().hex})
    chars = task.input_chars()
    if chars > spec.max_input_chars:
        raise ValidationError(
            f"input of {chars} characters is over model {spec.name!r}'s limit of "
            f"{spec.max_input_chars} (max_input_chars)"
        )
    return task


def _conversation_for(tenant: str, key: str | None) -> str | None:
    """The conversation a keyed dialogue task starts, the same on every resubmit (None: a new one)."""
    return None if key is None else uuid.uuid5(_CONVERSATIONS, f"{tenant}\n{key}").hex


_CONVERSATIONS = uuid.UUID("5b0c2a8e-6f1d-4f7e-9a51-3c7d0e2b9f44")
"""Namespace of the conversation ids derived from idempotency keys."""


def _task_list(tasks: Any) -> list[Any]:
    """The tasks of one submit as a list, at most MAX_JOBS_PER_SUBMIT of them."""
    try:
        items = list(itertools.islice(tasks, MAX_JOBS_PER_SUBMIT + 1))
    except TypeError:
        raise ValidationError(f"expected a list of tasks, got {type(tasks).__name__}") from None
    if len(items) > MAX_JOBS_PER_SUBMIT:
        raise ValidationError(f"more than {MAX_JOBS_PER_SUBMIT} tasks in one submit; submit them in chunks")
    return items


def _name(what: str, value: Any, max_chars: int) -> str | None:
    """A tenant, batch id or idempotency key: None, or 1–`max_chars` characters the table can store."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        shown = f"{len(value)} characters" if isinstance(value, str) else repr(value)[:80]
        raise ValidationError(f"{what} must be a string of 1–{max_chars} characters, got {shown}")
    bad = UNSTORABLE.search(value)
    if bad:
        raise ValidationError(f"{what} contains U+{ord(bad.group()):04X} at position {bad.start()}, "
                              "which cannot be stored (NUL and lone surrogates are not allowed)")
    return value


def webhook_url_of(value: Any) -> str | None:
    """A webhook URL's form checked: None, or an absolute http(s) URL with a host, storable, ≤ 2048 chars.

    Which addresses it may reach is the API's to check (`llmos.api.webhooks.check_url`), at
    submit and again before every POST.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"webhook_url must be a string (an http or https URL), got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_WEBHOOK_URL_CHARS:
        raise ValidationError(f"webhook_url must be 1–{MAX_WEBHOOK_URL_CHARS} characters, got {len(value)}")
    if UNSTORABLE.search(value) or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError("webhook_url contains whitespace or a control character; percent-encode it")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 (ValueError for a port that is not a number 0-65535)
    except ValueError as exc:
        raise ValidationError(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        shown = f"{parts.scheme}:" if parts.scheme else "no scheme"
        raise ValidationError(f"webhook_url must be an http:// or https:// URL, got {shown} ({value[:80]!r})")
    if not parts.hostname:
        raise ValidationError(f"webhook_url has no host: {value[:80]!r}")
    return value


def _keys(key: Any, n: int) -> list[str | None]:
    if key is None:
        return [None] * n
    if isinstance(key, str):
        if n != 1:
            raise ValidationError("one idempotency_key string fits one task; pass a list for many")
        return [_name("idempotency_key", key, MAX_IDEMPOTENCY_KEY_CHARS)]
    if not isinstance(key, collections.abc.Sequence):
        raise ValidationError(f"idempotency_key must be a string, or a list of strings (or None) "
                              f"one per task, got {type(key).__name__}")
    keys = list(itertools.islice(key, n + 1))
    if len(keys) != n:
        raise ValidationError(f"{len(keys)}{'+' if len(keys) > n else ''} idempotency keys for {n} tasks")
    return [_name("idempotency_key", k, MAX_IDEMPOTENCY_KEY_CHARS) for k in keys]


def _seconds(value: Any) -> float | None:
    """`value` as a finite float, or None if it is not a finite number (booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return value if math.isfinite(value) else None


def _timeout(value: Any, max_s: int) -> float | None:
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None or not 0 < seconds <= max_s:
        raise ValidationError(f"timeout_s must be a number of seconds over 0 and at most {max_s} "
                              f"(LLMOS_MAX_JOB_SECONDS), got {value!r}")
    return seconds


def _deadline(value: Any) -> tuple[datetime | None, float | None]:
    """(an aware UTC deadline, or seconds from the database's clock at insert); one is None."""
    if value is None:
        return None, None
    if not isinstance(value, datetime):
        seconds = _seconds(value)
        if seconds is None or not 0 < seconds <= MAX_DEADLINE_S:
            raise ValidationError(f"deadline must be a timezone-aware datetime, or seconds from now over 0 "
                                  f"and at most {MAX_DEADLINE_S}, got {value!r}")
        return None, seconds
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError("deadline must be timezone-aware (e.g. datetime.now(timezone.utc) + ...)")
    try:
        value = value.astimezone(timezone.utc)  # SQLite keeps wall-clock time only
        ahead = (value - manager.utcnow()).total_seconds()
    except OverflowError:
        ahead = math.inf
    if ahead > MAX_DEADLINE_S:
        raise ValidationError(f"deadline must be at most {MAX_DEADLINE_S} seconds (a year) ahead, got {value!r}")
    return value, None


class JobHandle:
    """A submitted job: its id, and ways to read its status, wait for its result, cancel it."""

    def __init__(self, client: Client, job_id: str, model: str, task_type: str,
                 tenant: str | None = None, *, group: _Group | None = None,
                 eta_start_at: datetime | None = None, eta_finish_at: datetime | None = None) -> None:
        self.client = client
        # predicted at submit (llmos.scheduling.eta; database clock); None when not known here
        self.eta_start_at = eta_start_at
        self.eta_finish_at = eta_finish_at
        self.id = job_id
        self.model = model
        self.task_type = task_type
        self.tenant = tenant or client.tenant
        self._group = group  # set by Client's submits: siblings read ahead (see `_Group`)

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, model={self.model!r}, task={self.task_type!r})"

    def job(self) -> Job:
        """The job's row as it is now."""
        return self.client.job(self.id, tenant=self.tenant)

    def status(self) -> JobStatus:
        return self.job().status

    def result(self, timeout: float | None = 300.0) -> TaskResult:
        """Wait for the job and return its typed result; raise JobFailedError if it failed."""
        if self._group is not None:
            return self.client._result(self, timeout)
        job = self.client.wait([self.id], timeout=timeout, tenant=self.tenant).get(self.id) or self.job()
        return result_of(job, timeout)

    def cancel(self) -> bool:
        """Cancel the job if it is still queued; True if it is now cancelled by this call."""
        return self.client.cancel(self.id, tenant=self.tenant)


def result_of(job: Job, timeout: float | None = None) -> TaskResult:
    return _result_of(job, job.task_type, timeout)


def _result_of(job: "Job | manager.JobOutcome", task_type: str, timeout: float | None) -> TaskResult:
    if job.status == JobStatus.SUCCEEDED:
        return task_class(task_type).result_type.model_validate(job.result)
    if job.status.is_final:
        raise JobFailedError(f"job {job.id} {job.status.value}: {job.error}", job_id=job.id,
                             status=job.status.value)
    raise JobTimeoutError(f"job {job.id} still {job.status.value} after {timeout} s")


class Model:
    """A registered model, as the SDK sees it."""

    def __init__(self, client: Client, spec: ModelSpec) -> None:
        self.client = client
        self.spec = spec
        self.name = spec.name

    def __repr__(self) -> str:
        return f"Model({self.name!r}, tasks={list(self.spec.tasks)})"

    def submit(self, task: Task, *, priority: int | str | None = None,
               idempotency_key: str | None = None, tenant: str | None = None,
               timeout_s: float | None = None, deadline: datetime | float | None = None,
               max_attempts: int = 3, webhook_url: str | None = None) -> JobHandle:
        """Enqueue one task; see `Client.submit` for the options (`webhook_url`: the final job is POSTed)."""
        return self.client.submit(self.name, [task], priority=priority,
                                  idempotency_key=idempotency_key, tenant=tenant,
                                  timeout_s=timeout_s, deadline=deadline, max_attempts=max_attempts,
                                  webhook_url=webhook_url)[0]

    def submit_many(self, tasks: Iterable[Task], *, priority: int | str | None = None,
                    tenant: str | None = None, batch_id: str | None = None,
                    idempotency_keys: Sequence[str | None] | None = None,
                    timeout_s: float | None = None, deadline: datetime | float | None = None,
                    max_attempts: int = 3, webhook_url: str | None = None) -> list[JobHandle]:
        """Validate every task first (nothing is written if one is bad), then enqueue them all.

        `webhook_url`: the batch is POSTed there once every job of it is final (a single task
        without a `batch_id`: the job, as `submit` does).
        """
        return self.client.submit(self.name, tasks, priority=priority, tenant=tenant,
                                  batch_id=batch_id, idempotency_key=idempotency_keys,
                                  timeout_s=timeout_s, deadline=deadline, max_attempts=max_attempts,
                                  webhook_url=webhook_url)

    def execute(self, task: Task, *, timeout: float | None = 300.0,
                priority: int | str | None = None, idempotency_key: str | None = None,
                tenant: str | None = None, timeout_s: float | None = None,
                deadline: datetime | float | None = None, max_attempts: int = 3) -> TaskResult:
        """Submit one task and wait up to `timeout` seconds for its result.

        If no live worker serves the model, it waits LLMOS_NO_WORKER_GRACE_S only, then raises
        NoWorkerError while the job is still queued and no worker has appeared.
        """
        handles, served = self.client._submit(  # no warning: the NoWorkerError below says it
            self.name, [task], priority=priority, idempotency_key=idempotency_key, tenant=tenant,
            batch_id=None, timeout_s=timeout_s, deadline=deadline, max_attempts=max_attempts,
            warn=False)
        handle = handles[0]
        if served or (timeout is not None and _seconds(timeout) is None):
            return handle.result(timeout=timeout)  # (a bad timeout raises ValidationError there)
        grace = self.client.settings.no_worker_grace_s
        if timeout is not None:
            grace = min(grace, timeout)
        start = time.monotonic()
        try:
            return handle.result(timeout=grace)
        except JobTimeoutError:
            if handle.status() == JobStatus.QUEUED and not self.client.has_worker(self.name):
                raise NoWorkerError(f"{no_worker_message(self.name)}: job {handle.id} is still queued "
                                    f"after {grace} s and stays queued until one starts") from None
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        return handle.result(timeout=left)

    def results(self, handles: Sequence[JobHandle], timeout: float | None = None) -> list[TaskResult]:
        """Wait for many jobs; results in the same order (raises on the first failed job)."""
        if isinstance(self.client, Client):
            return self.client._results(handles, timeout)
        until = None if timeout is None else time.monotonic() + timeout
        by_tenant: dict[str, list[str]] = {}
        for h in handles:
            by_tenant.setdefault(h.tenant, []).append(h.id)
        jobs: dict[str, Job] = {}
        for tenant, ids in by_tenant.items():  # one wait, unless the handles span tenants
            left = None if until is None else max(0.0, until - time.monotonic())
            jobs.update(self.client.wait(ids, timeout=left, tenant=tenant))
        return [result_of(jobs[h.id], timeout) for h in handles]


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> "Client | HTTPClient":
    """The process's client: over HTTP when LLMOS_URL is set (key: LLMOS_API_KEY), else direct."""
    global _default
    with _default_lock:
        if _default is None:
            settings = get_settings()
            if settings.url:
                from llmos.remote import HTTPClient

                key = settings.api_key.get_secret_value() if settings.api_key else None
                _default = HTTPClient(settings.url, key, settings=settings)
            else:
                _default = Client(settings)
        return _default


def load_model(name: str, *, client: Client | None = None) -> Model:
    """The seed's entry point: `model = llmos.load_model("minilm")`."""
    return (client or default_client()).load_model(name)
