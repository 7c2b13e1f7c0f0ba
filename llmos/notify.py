"""Completion notices over Redis pub/sub, so a caller waiting on a job wakes at once.

A notice is only a hint: waiters always re-read the task table, and poll it as a fallback, so a
lost notice delays a waiter by at most the poll interval and never loses a result.
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


def wait_until(client: redis.Redis | None, job_ids: Sequence[str], pending: Callable[[], set[str]],
               timeout: float | None, poll_s: float = 1.0) -> set[str]:
    """Block until `pending()` (re-read from the table) is empty or `timeout` passes.

    Subscribes first, then reads, so a notice that lands between the two is not missed.
    Returns the ids still pending.
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
        left = pending()
        while left:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            step = poll_s if remaining is None else min(poll_s, remaining)
            if pubsub is not None:
                try:
                    msg = pubsub.get_message(timeout=step)
                    # drain whatever else arrived, then re-read the table once
                    while msg is not None:
                        msg = pubsub.get_message(timeout=0)
                except redis.exceptions.ConnectionError:
                    pubsub = None
            else:
                time.sleep(step)
            left = pending()
        return left
    finally:
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.exceptions.RedisError:
                pass


def ping(client: redis.Redis, settings: Settings) -> None:
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        from llmos.dispatch import broker_error

        raise broker_error(settings, exc) from None

