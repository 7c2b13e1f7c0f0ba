"""Dispatch: the Celery app, one queue per model, and sending job ids at their priority.

Messages carry job ids only (JSON). The task table is the truth; a message is a wake-up. A
single submit sends one message per job (args `[id]`); a bulk submit packs up to `chunk` jobs
of one model and priority into one message (args `[[id, id, ...]]`, Celery's idea of `chunks`),
so Celery's per-message cost (delivery, a pool thread, the ack) is paid once per batch. Every
id of a message is pending, held and reconciled on its own, exactly as a one-id message's.
`Dispatcher` is the narrow interface producers use; `InMemoryDispatcher` is its twin for unit
tests, `CeleryDispatcher` the real one.

With `LLMOS_TASK_EVENTS` on, producers send Celery's "task-sent" event for each message (Flower
shows it as sent, then received, started, succeeded by the worker's own events): `args` is the
message's argsrepr, so the event names the job ids it carries, and `queue`/`routing_key` name
the model (`llmos.<model>`). The events of one pipelined send go out as one batched publish.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Protocol, Sequence

import redis
from celery import Celery

from llmos import transport
from llmos.constants import HELD_SET_PREFIX, PENDING_SET_PREFIX, QUEUE_PREFIX, RUN_JOB_TASK
from llmos.db import first_line
from llmos.errors import BrokerUnavailableError
from llmos.jobs import Job, new_ids
from llmos.priority import broker_priority
from llmos.settings import Settings, redact

log = logging.getLogger("llmos.dispatch")
_EVENTS_LOCK = threading.Lock()  # a dispatcher's event sender is made once, whichever thread sends first

def queue_name(model: str) -> str:
    """The Celery queue that carries `model`'s jobs."""
    return QUEUE_PREFIX + model


def make_celery(settings: Settings) -> Celery:
    """The Celery app shared by producers and workers (JSON only, late acks, prefetch 1)."""
    transport.register()  # settings.kombu_url names our transport (llmos-redis://)
    app = Celery("llmos", broker=settings.kombu_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # results live in the task table, not in Celery's backend
        result_backend=None,
        task_acks_late=True,  # a message is acked only after the job's outcome is written
        task_reject_on_worker_lost=True,  # a killed pool child's message is redelivered
        worker_prefetch_multiplier=1,  # prefetching more would defeat priorities
        task_create_missing_queues=True,
        task_default_queue=QUEUE_PREFIX + "default",
        broker_transport_options={
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            # Above the longest allowed job, or a healthy long job is delivered twice.
            "visibility_timeout": settings.max_job_seconds * 2,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_channel_error_retry=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 1.0},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Task events cost three Redis publishes per message; on only for Flower (LLMOS_TASK_EVENTS=1).
        worker_send_task_events=settings.task_events,
        # producers' "task-sent" events: Celery's send_task, and CeleryDispatcher.send (batched)
        task_send_sent_event=settings.task_events,
        worker_disable_rate_limits=True,
        worker_enable_remote_control=False,  # no pidbox consumer polling beside the model
    )
    return app


class Dispatcher(Protocol):
    """Sends wake-up messages for jobs already written to the task table."""

    def send(self, jobs: Sequence[Job], chunk: int = 1) -> None: ...

    def close(self) -> None: ...


class CeleryDispatcher:
    """Sends Celery messages to Redis: many jobs per pipelined round trip.

    Each message is the exact Celery protocol-2 message kombu's Redis transport would write
    (JSON body, base64 body encoding, the priority list `llmos.<model>` or `llmos.<model>:N`),
    built here and LPUSHed through one redis-py pipeline together with the pending-set SADDs:
    bulk submit costs one round trip per 1,000 jobs instead of one Celery publish each.
    `tests/integration/test_dispatch.py` checks the format against Celery's own send_task and
    that real workers consume it.
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        from llmos.notify import redis_client

        self.settings = settings
        self.app = app or make_celery(settings)
        self.redis = redis_client(settings)
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())
        self._events: Any = None  # the EventDispatcher of "task-sent" events, made on first use
        self._events_conn: Any = None

    def message(self, jobs: Sequence[Job], ids: Sequence[str] | None = None) -> tuple[str, str]:
        """(Redis list key, JSON payload) of the Celery message that wakes a worker for `jobs`
        (one model and priority; one job: args `[id]`, several: args `[[id, ...]]`).
        `ids`: two fresh UUIDs (task id, delivery tag), else made here."""
        first = jobs[0]
        task_id, tag = ids or new_ids(2)
        queue = queue_name(first.model)
        pri = broker_priority(first.priority)
        args = message_args(jobs)
        body = json.dumps([args, {}, _EMBED])
        payload = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": RUN_JOB_TASK, "id": task_id, "shadow": None, "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0,
                "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                "argsrepr": repr(args), "kwargsrepr": "{}", "origin": self.origin,
                "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
            },
            "properties": {
                "correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": pri,
                "body_encoding": "base64", "delivery_tag": tag,
            },
        }
        return queue_key(first.model, first.priority), json.dumps(payload)

    def send(self, jobs: Sequence[Job], chunk: int = 1) -> None:
        """Send wake-ups for `jobs`: one message per job, or (`chunk` > 1, our transport only)
        one per up to `chunk` consecutive jobs of one model and priority."""
        if not jobs:
            return
        if not self.settings.kombu_url.startswith(transport.SCHEME):
            chunk = 1  # kombu's own transport cannot bound the ids a worker holds (llmos.transport)
        groups = chunked(jobs, max(1, min(chunk, MAX_CHUNK)))
        try:
            for i in range(0, len(groups), 1000):
                part = groups[i:i + 1000]
                fresh = new_ids(2 * len(part))
                pipe = self.redis.pipeline(transaction=False)
                for n, group in enumerate(part):
                    key, payload = self.message(group, fresh[2 * n:2 * n + 2])
                    # the ids are pending before their message exists: see the reconciler
                    pipe.sadd(pending_set(group[0].model), *[j.id for j in group])
                    pipe.lpush(key, payload)
                pipe.execute()
                if self.app.conf.task_send_sent_event:
                    self._sent_events([(g, fresh[2 * n]) for n, g in enumerate(part)])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise broker_error(self.settings, exc) from None

    def _sent_events(self, sent: list[tuple[list[Job], str]]) -> None:
        """Celery's "task-sent" event for each (jobs, task id) message, in one batched publish.

        Best effort, as Celery's own: a failed event publish is logged, never fails the send
        (the messages are in Redis already)."""
        try:
            with _EVENTS_LOCK:
                if self._events is None:
                    from celery.events import EventDispatcher

                    self._events_conn = self.app.connection_for_write()
                    self._events = EventDispatcher(self._events_conn, app=self.app, hostname=self.origin,
                                                   buffer_group={"task"}, buffer_limit=len(sent) + 1,
                                                   buffer_while_offline=False)
                self._events.buffer_limit = max(self._events.buffer_limit, len(sent) + 1)
            for group, task_id in sent:
                queue = queue_name(group[0].model)
                self._events.send("task-sent", uuid=task_id, root_id=task_id, parent_id=None,
                                  name=RUN_JOB_TASK, args=repr(message_args(group)), kwargs="{}",
                                  retries=0, eta=None, expires=None, queue=queue, exchange="",
                                  routing_key=queue)
            self._events.flush(errors=False)
        except Exception as exc:  # events are for Flower; the jobs are sent
            log.warning("task-sent events not published: %r", exc)
            if self._events is not None:
                self._events._group_buffer.clear()  # do not resend them with the next batch

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events_conn.release()
        self.app.close()
        self.redis.close()


MAX_CHUNK = 256
"""Most job ids one message carries (a bulk submit packs up to the model's max_batch_size)."""

def message_args(jobs: Sequence[Job]) -> list[Any]:
    """A message's Celery args: `[id]` for one job, `[[id, ...]]` for several (a chunk)."""
    return [jobs[0].id] if len(jobs) == 1 else [[j.id for j in jobs]]


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def chunked(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """Consecutive runs of jobs of one model and priority, each cut to at most `size`."""
    groups: list[list[Job]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        if last and len(last) < size and last[0].model == job.model and last[0].priority == job.priority:
            last.append(job)
        else:
            groups.append([job])
    return groups


def pending_set(model: str) -> str:
    return PENDING_SET_PREFIX + model


def held_set(worker_id: str) -> str:
    return HELD_SET_PREFIX + worker_id


def take(client: redis.Redis, model: str, worker_id: str, job_id: str) -> None:
    """A worker took this job's message: pending → held by it, in one atomic step."""
    pipe = client.pipeline(transaction=True)
    pipe.srem(pending_set(model), job_id)
    pipe.sadd(held_set(worker_id), job_id)
    pipe.execute()


def release(client: redis.Redis, worker_id: str, job_ids: Sequence[str]) -> None:
    """The worker recorded these jobs (or found them not to run): it holds them no more."""
    if job_ids:
        client.srem(held_set(worker_id), *job_ids)


UNACKED_HASH, UNACKED_INDEX = "unacked", "unacked_index"
"""Where kombu's Redis transport keeps delivered, not yet acked messages (acks_late)."""


def delivered_before(client: redis.Redis, older_than_s: float) -> dict[str, float]:
    """Job id → delivery time (epoch s) of messages delivered over `older_than_s` ago, not acked.

    A live worker moves a delivered message's id to its held set within milliseconds; a job
    still `queued`, neither pending nor held, whose message was delivered (after its last send)
    long ago sat in the buffer of a worker that died at that moment, and its message would only
    come back after the visibility timeout. The reconciler re-sends those.
    """
    pairs = client.zrangebyscore(UNACKED_INDEX, "-inf", time.time() - older_than_s, withscores=True)
    if not pairs:
        return {}
    tags = [t for t, _ in pairs]
    ids: dict[str, float] = {}
    for (_, when), item in zip(pairs, client.hmget(UNACKED_HASH, tags)):
        try:
            job_ids = transport.job_ids_of_payload(json.loads(item)[0])
        except (TypeError, ValueError, KeyError, IndexError):
            job_ids = []
        for job_id in job_ids:  # none: not one of ours, or a format we do not know (visibility timeout)
            ids[job_id] = max(ids.get(job_id, 0.0), float(when))
    return ids


def _job_id_of(raw: bytes | str) -> str | None:
    """The first job id of a stored message (a chunk's jobs were all sent at once)."""
    try:
        ids = transport.job_ids_of_payload(json.loads(raw))
    except (TypeError, ValueError):
        return None
    return ids[0] if ids else None


def queue_keys(model: str) -> list[str]:
    """The ten priority lists of a model's queue."""
    q = queue_name(model)
    return [q] + [f"{q}:{p}" for p in range(1, 10)]


def queue_key(model: str, priority: int) -> str:
    """The priority list a job's message is sent to (as `CeleryDispatcher.message` and kombu name it)."""
    pri = broker_priority(priority)
    return f"{queue_name(model)}:{pri}" if pri else queue_name(model)


def queue_lengths(client: redis.Redis, models: Sequence[str]) -> dict[tuple[str, int], int]:
    """Messages waiting in each priority list of each model's queue: {(model, user priority 0-9): n}.

    LLEN of ten lists per model (`queue_key`), O(1) each, in one round trip. A bulk submit's
    message holds up to max_batch_size job ids; a cancelled job's message stays until a worker
    skips it. /metrics (llmos_queue_messages) and the dashboard's queue panel read this."""
    keys = [(m, p, queue_key(m, p)) for m in models for p in range(9, -1, -1)]
    if not keys:
        return {}
    pipe = client.pipeline(transaction=False)
    for _, _, key in keys:
        pipe.llen(key)
    return {(m, p): int(n) for (m, p, _), n in zip(keys, pipe.execute())}


def queue_tails(client: redis.Redis, model: str) -> dict[str, tuple[int, str | None]]:
    """Per priority list of `model`'s queue: (length, job id of its oldest message or None).

    Twenty O(1) commands in one round trip, however long the lists are: messages are LPUSHed
    and popped from the right, so the rightmost is the oldest, the next to be served.
    """
    keys = queue_keys(model)
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.llen(k)
        pipe.lindex(k, -1)
    replies = pipe.execute()
    return {k: (int(replies[2 * i]), _job_id_of(replies[2 * i + 1]) if replies[2 * i + 1] else None)
            for i, k in enumerate(keys)}


class InMemoryDispatcher:
    """Records what would be sent, per queue, with the broker priority (unit tests)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []  # (queue, job id, broker priority)
        self.messages: list[list[str]] = []  # the job ids of each message

    def send(self, jobs: Sequence[Job], chunk: int = 1) -> None:
        for group in chunked(jobs, max(1, min(chunk, MAX_CHUNK))):
            self.messages.append([j.id for j in group])
        for job in jobs:
            self.sent.append((queue_name(job.model), job.id, broker_priority(job.priority)))

    def close(self) -> None:
        pass


def broker_error(settings: Settings, exc: BaseException) -> BrokerUnavailableError:
    where = redact(settings.broker_url)
    hint = ("start it with `llmos up` (embedded) or set LLMOS_REDIS_URL to a running Redis"
            if settings.embedded_redis else "is it running? check LLMOS_REDIS_URL")
    return BrokerUnavailableError(f"cannot reach Redis at {where}: {first_line(exc)}; {hint}")
