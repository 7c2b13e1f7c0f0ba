"""The Python SDK: `load_model(name)`, then `execute`, `submit` or `submit_many` tasks.

The SDK talks to the same database and Redis as the workers. Submitting validates the task
against the model's registry entry, writes the job row (`queued`), then sends its id to the
model's queue at its priority. Waiting subscribes to completion notices and reads the table.
"""

from __future__ import annotations

import collections.abc
import itertools
import logging
import math
import threading
import time
import urllib.parse
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import redis
import sqlalchemy as sa

from llmos import manager
from llmos.constants import (CANCEL_CHANNEL, DEFAULT_TENANT, MAX_ATTEMPTS, MAX_BATCH_ID_CHARS,
                             MAX_DEADLINE_S, MAX_IDEMPOTENCY_KEY_CHARS, MAX_JOBS_PER_SUBMIT,
                             MAX_TENANT_CHARS, WAIT_MAX_POLL_S, WAIT_POLL_S)
from llmos.db import MAX_WEBHOOK_URL_CHARS, UNSTORABLE, check_database, first_line, get_engine
from llmos.dispatch import CeleryDispatcher, Dispatcher
from llmos.errors import (DatabaseUnavailableError, JobFailedError, JobNotFoundError,
                          JobTimeoutError, LLMOSError, NoWorkerError, NoWorkerWarning,
                          ValidationError)
from llmos.jobs import Job, JobStatus
from llmos.logs import event
from llmos.notify import channel, ping, redis_client, wait_until
from llmos.priority import parse_priority
from llmos.registry import ModelSpec, Registry
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
            return self._redis

    def close(self) -> None:
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
               max_attempts: int = 3, webhook_url: str | None = None) -> list["JobHandle"]:
        """Validate, write and send `tasks` for `model`; one handle per task, in order.

        `timeout_s`: longest a job may run (then it fails with reason timeout); `deadline`: a
        time (or seconds from now) after which a job that has not started is `expired`;
        `max_attempts`: runs before a job whose worker keeps dying is failed; `webhook_url`: an
        http(s) URL an API process POSTs the final job to (one task without a batch id), else
        the final batch (several tasks get a new batch id if none is given). Every argument is
        checked first: a ValidationError means nothing was written or sent. If no live worker
        serves `model`, a NoWorkerWarning says how to start one (the jobs wait queued).
        """
        return self._submit(model, tasks, priority=priority, idempotency_key=idempotency_key,
                            tenant=tenant, batch_id=batch_id, timeout_s=timeout_s,
                            deadline=deadline, max_attempts=max_attempts, warn=True,
                            webhook_url=webhook_url)[0]

    def _submit(self, model: str, tasks: Iterable[Task], *, priority: int | str | None,
                idempotency_key: str | Sequence[str | None] | None, tenant: str | None,
                batch_id: str | None, timeout_s: float | None, deadline: datetime | float | None,
                max_attempts: int, warn: bool, webhook_url: str | None = None) -> tuple[list["JobHandle"], bool]:
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
        new = [manager.NewJob(model=spec.name, task_type=t.task_type, input=t.model_dump(mode="json"),
                              priority=prio, tenant=tenant, idempotency_key=k,
                              batch_id=batch_id, conversation_id=getattr(t, "conversation_id", None),
                              timeout_s=timeout_s, deadline=deadline, deadline_in_s=deadline_in_s,
                              max_attempts=max_attempts)
               for t, k in zip(checked, keys)]
        if not new:
            return [], False
        if self._dispatcher is None or isinstance(self._dispatcher, CeleryDispatcher):
            ping(self.redis, self.settings)  # fail before writing anything if Redis is down
        created = self._db(manager.create_jobs, new, webhook_url=webhook_url)
        to_send = [job for job, is_new in created if is_new]
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
        return [JobHandle(self, job.id, job.model, job.task_type, tenant) for job, _ in created], served

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
        (or a status poll finds it) final; the fallback polls read statuses only.
        """
        tenant = self._tenant(tenant)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):  # `not >=`: NaN too
            raise ValidationError(f"timeout must be a number of seconds (0 or more) or None, got {timeout!r}")
        ids = list(dict.fromkeys(_job_id(j) for j in job_ids))
        latest: dict[str, Job] = {}
        remaining = set(ids)

        def read_final(candidates: set[str]) -> None:
            for job_id, job in self._db(manager.get_jobs, sorted(candidates), tenant=tenant).items():
                if job.status.is_final:
                    latest[job_id] = job
                    remaining.discard(job_id)

        def pending(announced: set[str] | None) -> set[str]:
            if announced is None:  # a status poll of every pending job
                statuses = self._db(manager.job_statuses, sorted(remaining), tenant=tenant)
                missing = remaining - set(statuses)
                if missing:
                    raise JobNotFoundError(f"no job with id {sorted(missing)[0]!r}")
                read_final({i for i, s in statuses.items() if s.is_final})
            elif announced & remaining:
                read_final(announced & remaining)
            return set(remaining)

        wait_until(self.redis, ids, pending, timeout, poll_s=WAIT_POLL_S, max_poll_s=WAIT_MAX_POLL_S)
        if remaining:  # timed out: the rest as they are now
            latest.update(self._db(manager.get_jobs, sorted(remaining), tenant=tenant))
        return latest

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
                self.redis.publish(channel(str(job_id)), "done")
            except (redis.exceptions.RedisError, LLMOSError):
                pass  # the table says cancelled; a running job then just finishes unrecorded
        return done

    def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self.engine, *args, **kwargs)
        except sa.exc.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot reach the database at {redact(self.settings.db_url)}: "
                f"{first_line(exc.orig or exc)}"
            ) from None


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
                 tenant: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.model = model
        self.task_type = task_type
        self.tenant = tenant or client.tenant

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, model={self.model!r}, task={self.task_type!r})"

    def job(self) -> Job:
        """The job's row as it is now."""
        return self.client.job(self.id, tenant=self.tenant)

    def status(self) -> JobStatus:
        return self.job().status

    def result(self, timeout: float | None = 300.0) -> TaskResult:
        """Wait for the job and return its typed result; raise JobFailedError if it failed."""
        job = self.client.wait([self.id], timeout=timeout, tenant=self.tenant).get(self.id) or self.job()
        return result_of(job, timeout)

    def cancel(self) -> bool:
        """Cancel the job if it is still queued; True if it is now cancelled by this call."""
        return self.client.cancel(self.id, tenant=self.tenant)


def result_of(job: Job, timeout: float | None = None) -> TaskResult:
    if job.status == JobStatus.SUCCEEDED:
        return task_class(job.task_type).result_type.model_validate(job.result)
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
