"""Completion notices over Redis pub/sub, so a caller waiting on a job wakes at once.

A notice is only a hint: a waiter reads the announced jobs from the task table, and polls their
statuses as a fallback, so a lost notice delays a waiter by at most the poll interval and never
loses a result.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import redis

from llmos.constants import DONE_CHANNEL_PREFIX
from llmos.settings import Settings


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5,
                                health_check_interval=30)


def channel(job_id: str) -> str:
    return DONE_CHANNEL_PREFIX + job_id


def publish_done(client: redis.Redis, job_ids: Iterable[str]) -> None:
    """Announce final states, one pipelined round trip for the whole batch."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.publish(channel(job_id), "done")
    pipe.execute()


def wait_until(client: redis.Redis | None, job_ids: Sequence[str],
               pending: Callable[[set[str] | None], set[str]], timeout: float | None,
               poll_s: float = 1.0, max_poll_s: float = 8.0) -> set[str]:
    """Block until `pending` reports nothing left, or `timeout` passes; returns the ids still pending.

    `pending(announced)` re-reads the table and returns the ids not yet final: with the set of
    ids whose completion notice just arrived (taken from the channel names), or with None for a
    poll of every pending id (at the start, and after `poll_s` without a notice, that pause
    doubling up to `max_poll_s` while notices can arrive; notices are the fast path, the poll
    only catches one that was lost). Subscribes first, then reads, so no notice is missed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = None
    if client is not None:
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            for i in range(0, len(job_ids), 1000):
                pubsub.subscribe(*[channel(j) for j in job_ids[i:i + 1000]])
        except redis.exceptions.ConnectionError:
            pubsub = None  # fall back to polling the table
    try:
        left = pending(None)
        interval = poll_s
        poll_at = time.monotonic() + interval
        while left:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            step = max(0.0, poll_at - now if deadline is None else min(poll_at, deadline) - now)
            announced = _notices(pubsub, step) if pubsub is not None else None
            if announced is None:  # no pub/sub: the table is the only source
                pubsub = None
                time.sleep(step)
            elif announced:
                left = pending(announced)
                poll_at = time.monotonic() + interval  # notices flow: no need to poll yet
                continue
            if time.monotonic() >= poll_at:
                left = pending(None)
                if pubsub is not None:
                    interval = min(interval * 2, max_poll_s)
                poll_at = time.monotonic() + interval
        return left
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.exceptions.RedisError:
                pass


def _notices(pubsub: "redis.client.PubSub", timeout: float) -> set[str] | None:
    """Ids announced within `timeout` (the first notice, then whatever else already arrived).

    None when the connection broke (the caller falls back to polling).
    """
    announced: set[str] = set()
    try:
        msg = pubsub.get_message(timeout=timeout)
        while msg is not None:
            name = msg.get("channel")
            name = name.decode() if isinstance(name, bytes) else name
            if msg.get("type") == "message" and name and name.startswith(DONE_CHANNEL_PREFIX):
                announced.add(name[len(DONE_CHANNEL_PREFIX):])
            msg = pubsub.get_message(timeout=0)
    except redis.exceptions.ConnectionError:
        return None
    return announced


def ping(client: redis.Redis, settings: Settings) -> None:
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        from llmos.dispatch import broker_error

        raise broker_error(settings, exc) from None

