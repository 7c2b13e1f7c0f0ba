"""Completion notices over Redis pub/sub, so a caller waiting on a job wakes at once.

Workers (after each recorded batch), the reconciler and a cancel publish the ids of jobs that
reached a final state: one message per call (up to NOTICE_MAX_IDS ids, joined by ","), on the
one channel DONE_CHANNEL. A producer's Client keeps one subscription to it open
(`DoneListener`: a daemon thread), records the announced ids it cares about and wakes its
waiters.

A notice is only a hint: a waiter reads the announced jobs from the task table, and polls their
statuses as a fallback, so a lost notice delays a waiter by at most the poll interval and never
loses a result.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from typing import Any, Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from llmos.constants import DONE_CHANNEL
from llmos.logs import event
from llmos.settings import Settings

log = logging.getLogger("llmos.notify")

NOTICE_MAX_IDS = 1000
"""Most job ids in one notice (a message of about 37 kB)."""

MAX_TRACKED_SUBMITS = 200_000
"""Most jobs a listener remembers as submitted by its client and not yet collected (about 200
bytes each). Jobs submitted past this are waited for as jobs from elsewhere: one status read
first. Jobs being waited on are always remembered, whatever their number."""

LISTEN_TICK_S = 1.0
"""Longest the listener thread blocks on its connection before it looks at its stop flag."""

READY_WAIT_S = 2.0
"""Longest a first submit or wait waits for the listener's first subscription (one round trip
when Redis answers; a Redis that does not answer is then polled around)."""


def redis_client(settings: Settings, *, retries: bool = True) -> redis.Redis:
    """A Redis client on the broker (`retries=False`: a broken connection raises at once)."""
    extra: dict[str, Any] = {} if retries else {"retry": Retry(NoBackoff(), 0)}
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5,
                                health_check_interval=30, **extra)


def publish_done(client: redis.Redis, job_ids: Iterable[str]) -> None:
    """Announce final states: one message per NOTICE_MAX_IDS ids, one round trip for them all."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return
    if len(ids) <= NOTICE_MAX_IDS:
        client.publish(DONE_CHANNEL, ",".join(ids))
        return
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(ids), NOTICE_MAX_IDS):
        pipe.publish(DONE_CHANNEL, ",".join(ids[i:i + NOTICE_MAX_IDS]))
    pipe.execute()


def notice_ids(data: Any) -> list[str]:
    """The job ids of one notice's payload."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("ascii", "replace")
    return [i for i in str(data).split(",") if i] if data else []


class DoneListener:
    """One subscription to DONE_CHANNEL for one Client, kept open by a daemon thread.

    State, all under `cond` (a Condition whose notify_all wakes the waiters):
    - `epoch`: bumped by every confirmed (re)subscription; `live`: subscribed now. A notice
      published while `live` at one epoch reaches us unless the epoch changes: a waiter that saw
      epoch e and sees it still need not poll; a change means notices may have been lost.
    - `submitted`: id → (epoch, tenant) of jobs this client created while `live` (at most
      MAX_TRACKED_SUBMITS), until their result is collected or their handles are garbage.
    - `watched`: id → number of waits on it now.
    - `announced`: the ids among those two whose notice arrived, not yet collected.
    Memory is bounded by what is submitted-and-not-collected (capped) plus what is being waited on;
    the notices of every other job (other clients, other tenants) are read and dropped.
    """

    def __init__(self, client: redis.Redis, name: str = "llmos-notices") -> None:
        self.client = client
        self.cond = threading.Condition()
        self.epoch = 0
        self.live = False
        self.tried = False  # the first subscription attempt has ended (either way)
        self.submitted: dict[str, tuple[int, str]] = {}
        self.watched: dict[str, int] = {}
        self.announced: set[str] = set()
        self.pid = os.getpid()
        self._forget: collections.deque[Iterable[str]] = collections.deque()  # from GC finalizers
        self._closed = threading.Event()
        self._pubsub: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._start_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, wait_s: float = READY_WAIT_S) -> "DoneListener":
        """Start the thread (once); wait up to `wait_s` for its first attempt to subscribe."""
        with self._start_lock:
            if not self._started:
                self._started = True
                self._thread.start()
        if not self.tried:
            with self.cond:
                self.cond.wait_for(lambda: self.tried or self._closed.is_set(), wait_s)
        return self

    def close(self, timeout: float = 2.0) -> None:
        self._closed.set()
        ps = self._pubsub
        sock = getattr(getattr(ps, "connection", None), "_sock", None)
        if sock is not None:
            try:  # wake the thread's blocking read at once (it then closes the connection)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self.cond:
            self.live = False
            self.cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _run(self) -> None:
        backoff = 0.1
        down_since_logged = False
        while not self._closed.is_set():
            ps = None
            try:
                ps = self.client.pubsub()
                self._pubsub = ps
                ps.subscribe(DONE_CHANNEL)
                while not self._closed.is_set():
                    msg = ps.get_message(timeout=LISTEN_TICK_S)
                    if self._forget:
                        with self.cond:
                            self._drain_forgotten()
                    if msg is not None and self._on_message(msg):
                        backoff, down_since_logged = 0.1, False
            except Exception as exc:  # noqa: BLE001 (a broken or closed connection, however it shows)
                if self._closed.is_set():
                    break
                with self.cond:
                    self.live = False
                    self.tried = True
                    self.cond.notify_all()
                if not down_since_logged:
                    event(log, "notices_down", logging.WARNING, error=repr(exc)[:200])
                    down_since_logged = True
            finally:
                self._pubsub = None
                if ps is not None:
                    try:
                        ps.close()
                    except Exception:  # noqa: BLE001
                        pass
            if self._closed.wait(backoff):
                break
            backoff = min(backoff * 2, 5.0)
        with self.cond:
            self.live = False
            self.tried = True
            self.cond.notify_all()

    def _on_message(self, msg: dict) -> bool:
        """Handle one pub/sub message; True when it was a subscription confirmation."""
        kind = msg.get("type")
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind == "subscribe":
            with self.cond:
                self.epoch += 1
                self.live = True
                self.tried = True
                self.cond.notify_all()
            return True
        if kind == "message":
            ids = notice_ids(msg.get("data"))
            with self.cond:
                sub, watched = self.submitted, self.watched
                hits = [i for i in ids if i in sub or i in watched]
                if hits:
                    self.announced.update(hits)
                    self.cond.notify_all()
        return False

    # -- state (callers hold `cond` where it says so) ---------------------------------------
    def state(self) -> int | None:
        """The epoch if subscribed now, else None (read under `cond` for a consistent view)."""
        return self.epoch if self.live else None

    def track(self, ids: Iterable[str], epoch: int | None, tenant: str) -> None:
        """Remember jobs just created by this client, if subscribed since before their insert."""
        with self.cond:
            self._drain_forgotten()
            if epoch is None or self.state() != epoch:
                return  # the subscription broke meanwhile: these jobs get a status read when waited
            room = MAX_TRACKED_SUBMITS - len(self.submitted)
            entry = (epoch, tenant)
            for job_id in ids:
                if room <= 0:
                    break
                if job_id not in self.submitted:
                    self.submitted[job_id] = entry
                    room -= 1

    def covered(self, ids: Iterable[str], tenant: str) -> set[str]:
        """Of `ids`, those whose notice cannot have been missed (caller holds `cond`)."""
        epoch = self.state()
        if epoch is None:
            return set()
        entry = (epoch, tenant)
        sub = self.submitted
        return {i for i in ids if sub.get(i) == entry}

    def watch(self, ids: Iterable[str]) -> None:
        """Record notices of `ids` while waited on (caller holds `cond`)."""
        w = self.watched
        for i in ids:
            w[i] = w.get(i, 0) + 1

    def unwatch(self, ids: Iterable[str]) -> None:
        """End one wait on `ids` (caller holds `cond`)."""
        w, sub, ann = self.watched, self.submitted, self.announced
        for i in ids:
            n = w.get(i, 0) - 1
            if n > 0:
                w[i] = n
            else:
                w.pop(i, None)
                if i not in sub:
                    ann.discard(i)

    def collected(self, ids: Iterable[str]) -> None:
        """Jobs whose final row was read: no longer remembered as submitted (caller holds `cond`)."""
        w, sub, ann = self.watched, self.submitted, self.announced
        for i in ids:
            sub.pop(i, None)
            if i not in w:
                ann.discard(i)

    def forget_later(self, ids: Iterable[str]) -> None:
        """Forget jobs (their handles are gone); safe from a GC finalizer: no lock taken here."""
        self._forget.append(ids)

    def _drain_forgotten(self) -> None:
        while self._forget:
            try:
                ids = self._forget.popleft()
            except IndexError:
                break
            self.collected(ids)


def ping(client: redis.Redis, settings: Settings) -> None:
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        from llmos.dispatch import broker_error

        raise broker_error(settings, exc) from None
