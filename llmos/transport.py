"""Our kombu transport: kombu's Redis transport with less work per message on the worker.

A worker's consumer thread (Celery's event loop) spends its time on Redis round trips made for
each message, and it shares the CPU and the GIL with the model. Measured per job here (a tiny
model, `docs/benchmarks.md`): about 0.8 ms on the event loop and 0.3–0.5 ms in the pool
threads. This transport keeps kombu's keys and wire format (producers, Flower and plain
`redis://` Celery workers see the same lists, `unacked` hash and index) and changes three things:

- **One Redis client per channel.** kombu builds a new `redis.Redis` for every delivery it
  records and every ack; redis-py's constructor costs ~160 µs of Python here. The channel keeps
  one client on its connection pool (redis-py clients are thread-safe) and builds a new one only
  when kombu replaced the pool.
- **Taking a job is part of recording its delivery.** With the `llmos_take` transport option
  (the worker sets it: its model's pending set and its own held set), the MULTI that writes
  kombu's `unacked` record also moves the job id pending → held (see `llmos.dispatch.take` and
  the reconciler), so "delivered" and "held by this worker" change in one atomic step, and the
  pool thread makes no round trip of its own.
- **Acks are written in bulk.** An ack still leaves kombu's in-memory state at once (prefetch
  counting, restore at shutdown), but its removal from `unacked` is written by a flusher thread,
  up to `ACK_DELAY_S` later, for every tag acked meanwhile in one ZREM and one HDEL. A worker
  that dies in that window leaves those messages in `unacked`; kombu redelivers them after the
  visibility timeout and the worker's claim finds their jobs already final (a no-op).

The transport is chosen by the URL scheme `llmos-redis://` (`llmos-redis+socket://` for a unix
socket), which `Settings.kombu_url` writes; `make_celery` registers the alias.
"""

from __future__ import annotations

import json
import threading
import time

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from llmos.constants import RUN_JOB_TASK

SCHEME = "llmos-redis"
ACK_DELAY_S = 0.002
"""How long the flusher gathers acks before writing them (a batch's acks arrive together)."""


def job_id_of(message) -> str | None:
    """The job id an LLMOS message carries, or None for any other message."""
    try:
        if (message.headers or {}).get("task") != RUN_JOB_TASK:
            return None
        body = message.body
        return str(json.loads(body)[0][0])
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        return None


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._acked: list[str] = []
        self._ack_lock = threading.Lock()
        self._ack_ready = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closing = False

    def append(self, message, delivery_tag) -> None:
        delivery = message.delivery_info
        take = self.channel.llmos_take
        job_id = job_id_of(message) if take else None
        pipe = self.channel.client_for_commands().pipeline()  # MULTI … EXEC
        pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
        pipe.hset(self.unacked_key, delivery_tag,
                  dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
        if job_id:
            pipe.srem(take["pending"], job_id)
            pipe.sadd(take["held"], job_id)
        pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag) -> None:
        with self._ack_lock:
            self._acked.append(delivery_tag)
            if self._flusher is None and not self._closing:
                self._flusher = threading.Thread(target=self._flush_loop, name="llmos-acks", daemon=True)
                self._flusher.start()
        self._ack_ready.set()
        virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        """Write every pending ack now (one ZREM and one HDEL)."""
        with self._ack_lock:
            tags, self._acked = self._acked, []
        if tags:
            pipe = self.channel.client_for_commands().pipeline()
            pipe.zrem(self.unacked_index_key, *tags)
            pipe.hdel(self.unacked_key, *tags)
            pipe.execute()

    def close(self) -> None:
        self._closing = True
        self._ack_ready.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(5.0)
        self.flush_acks()

    def _flush_loop(self) -> None:
        while not self._closing:
            self._ack_ready.wait()
            if self._closing:
                return
            self._ack_ready.clear()
            time.sleep(ACK_DELAY_S)  # let the rest of the batch's acks arrive
            try:
                self.flush_acks()
            except Exception:  # Redis is down: the tags stay in unacked, redelivery is harmless
                pass


class Channel(kombu_redis.Channel):
    QoS = QoS
    _llmos_client = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        take = self.connection.client.transport_options.get("llmos_take")
        self.llmos_take = dict(take) if take else None

    def client_for_commands(self):
        return self._create_client()

    def _create_client(self, asynchronous: bool = False):  # type: ignore[override]
        if asynchronous:  # the event loop's BRPOP client: kombu caches that one itself
            return super()._create_client(asynchronous=True)
        client = self._llmos_client
        if client is None or client.connection_pool is not self.pool:
            client = self._llmos_client = super()._create_client(asynchronous=False)
        return client

    def close(self) -> None:
        qos = self._qos
        if qos is not None and not self.closed:
            try:
                qos.close()
            except Exception:  # Redis is gone: the messages come back after the visibility timeout
                pass
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> str:
    """Make `llmos-redis://` URLs resolve to this transport (idempotent); returns the scheme."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
    return SCHEME


register()
