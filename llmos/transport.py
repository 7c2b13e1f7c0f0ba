"""Our kombu transport: kombu's Redis transport with less work per message on the worker.

A worker's consumer thread (Celery's event loop) spends its time on Redis round trips made for
each message, and it shares the CPU and the GIL with the model. This transport keeps kombu's
keys and wire format (producers, Flower and plain `redis://` Celery workers see the same lists,
`unacked` hash and index) and changes four things:

- **One Redis client per channel.** kombu builds a new `redis.Redis` for every delivery it
  records and every ack; redis-py's constructor costs ~160 µs of Python here. The channel keeps
  one client on its connection pool (redis-py clients are thread-safe) and builds a new one only
  when kombu replaced the pool.
- **Taking a job is part of recording its delivery.** With the `llmos_take` transport option
  (the worker sets it: its model's pending set and its own held set), the MULTI that writes
  kombu's `unacked` record also moves the job id pending → held (see `llmos.dispatch.take` and
  the reconciler), so "delivered" and "held by this worker" change in one atomic step, and the
  pool thread makes no round trip of its own. Whenever kombu puts a message back in its queue
  (restore at shutdown or reconnect, a requeue, a visibility-timeout sweep by any worker), the
  same MULTI puts the job id back in its model's pending set and (unless it is a sweep, which
  may restore another worker's messages) out of this worker's held set.
- **Messages are popped in bulk.** kombu pops one message per BRPOP and then records it with a
  MULTI: two round trips per message on the event loop. After each BRPOP a worker's channel
  runs one Lua script that pops up to its free prefetch room, in priority order, and writes
  the same `unacked` records and takes as `QoS.append` would. The script also lists the tags it
  recorded under a per-pop key (`BURST_PREFIX`); when its reply is lost (the connection dropped
  after the script ran), the channel reads that key, at once or on its next read, and restores
  those messages: back in their lists, their jobs pending again, out of the held set.
- **Acks are written in bulk.** An ack still leaves kombu's in-memory state at once (prefetch
  counting, restore at shutdown), but its removal from `unacked` is written by a flusher thread,
  up to `ACK_DELAY_S` later, for every tag acked meanwhile in one ZREM and one HDEL. A failed
  write is retried; a worker that dies before the write leaves those messages in `unacked`, and
  kombu redelivers them after the visibility timeout: their jobs are already final, so the
  worker's claim is a no-op. Acks made after the channel started closing are written at once.

Measured effect: docs/benchmarks.md ("Where the encoder's gap goes"). The transport is chosen by
the URL scheme `llmos-redis://` (`llmos-redis+socket://` for a unix socket), which
`Settings.kombu_url` writes; `make_celery` registers the alias.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from llmos.constants import PENDING_SET_PREFIX, QUEUE_PREFIX, RUN_JOB_TASK

log = logging.getLogger("llmos.transport")

SCHEME = "llmos-redis"
ACK_DELAY_S = 0.002
"""How long the flusher gathers acks before writing them (a batch's acks arrive together)."""
ACK_RETRY_S = 60.0
"""How long a failed ack write is retried before the acks are left to the visibility timeout."""


def job_ids_from(headers: Any, body: Any) -> list[str]:
    """The job ids an LLMOS message carries (its decoded JSON body: args `[id]` or `[[id, ...]]`,
    or kwargs `job_id`), or [] for any other message."""
    if not isinstance(headers, dict) or headers.get("task") != RUN_JOB_TASK:
        return []
    try:
        decoded = json.loads(body)
    except (TypeError, ValueError):
        return []
    if not isinstance(decoded, list) or len(decoded) < 2:
        return []
    args, kwargs = decoded[0], decoded[1]
    if isinstance(args, list) and args:
        value = args[0]
    else:
        value = kwargs.get("job_id") if isinstance(kwargs, dict) else None
    return _ids_of(value)


def _ids_of(value: Any) -> list[str]:
    """A task argument as job ids: one id, or a list of ids (anything else: none)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    return []


def job_ids_of_payload(payload: Any) -> list[str]:
    """The job ids of a message as kombu stores it (the JSON payload, body still encoded)."""
    try:
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return job_ids_from(payload["headers"], body)
    except (TypeError, ValueError, KeyError, AttributeError):
        return []


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._acked: list[str] = []
        self._ack_lock = threading.Lock()
        self._ack_ready = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closing = False
        self.prerecorded: dict[str, int] = {}  # delivered by the bulk pop, already in `unacked`: tag → ids
        self._ids: dict[str, int] = {}  # delivery tag → job ids its message carries (delivered ones)

    def ids_in_hand(self) -> int:
        """Job ids carried by the messages delivered and not yet acked."""
        delivered, dirty, total = self._delivered, self._dirty, 0
        for tag in [t for t in self._ids if t not in delivered]:
            del self._ids[tag]
        for tag, n in self._ids.items():
            if tag not in dirty:
                total += n
        return total

    def id_room(self) -> int | None:
        """How many more job ids this worker may take (None: no bound, `llmos_take` has no `max_ids`)."""
        take = self.channel.llmos_take
        limit = take.get("max_ids") if take else None
        return None if not limit else max(0, int(limit) - self.ids_in_hand())

    def can_consume(self) -> bool:
        """kombu's prefetch count in messages, and our bound in job ids: a message may carry a
        whole batch, and a worker holding 2 × prefetch batches would starve urgent jobs."""
        if not super().can_consume():
            return False
        room = self.id_room()
        return room is None or room > 0

    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self.prerecorded:
            self._ids[delivery_tag] = self.prerecorded.pop(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        delivery = message.delivery_info
        take = self.channel.llmos_take
        job_ids = job_ids_from(message.headers, message.body)
        pipe = self.channel.client_for_commands().pipeline()  # MULTI … EXEC
        pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
        pipe.hset(self.unacked_key, delivery_tag,
                  dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
        if job_ids and take:
            pipe.srem(take["pending"], *job_ids)
            pipe.sadd(take["held"], *job_ids)
        pipe.execute()
        self._ids[delivery_tag] = max(1, len(job_ids))
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag) -> None:
        with self._ack_lock:
            self._acked.append(delivery_tag)
            closing = self._closing
            if self._flusher is None and not closing:
                self._flusher = threading.Thread(target=self._flush_loop, name="llmos-acks", daemon=True)
                self._flusher.start()
        virtual.QoS.ack(self, delivery_tag)
        if closing:  # no flusher any more: write it now
            try:
                self.flush_acks()
            except (redis.RedisError, OSError) as exc:
                log.warning("ack not written (the message comes back after the visibility timeout): %r", exc)
        else:
            self._ack_ready.set()

    def flush_acks(self) -> None:
        """Write every pending ack now (one ZREM and one HDEL); on failure they stay pending."""
        with self._ack_lock:
            tags, self._acked = self._acked, []
        if not tags:
            return
        try:
            pipe = self.channel.client_for_commands().pipeline()
            pipe.zrem(self.unacked_index_key, *tags)
            pipe.hdel(self.unacked_key, *tags)
            pipe.execute()
        except BaseException:
            with self._ack_lock:
                self._acked[:0] = tags
            raise

    def restore_visible(self, *args, **kwargs) -> None:
        """kombu's visibility-timeout sweep, flagged so that restores leave held sets alone."""
        self.channel._sweeping.active = True
        try:
            super().restore_visible(*args, **kwargs)
        finally:
            self.channel._sweeping.active = False

    def close(self) -> None:
        with self._ack_lock:
            self._closing = True
        self._ack_ready.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(1.0)
        self.flush_acks()

    def _flush_loop(self) -> None:
        failing_since = None
        while not self._closing:
            self._ack_ready.wait()
            if self._closing:
                return
            self._ack_ready.clear()
            time.sleep(ACK_DELAY_S)  # let the rest of the batch's acks arrive
            try:
                self.flush_acks()
                failing_since = None
            except (redis.RedisError, OSError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > ACK_RETRY_S:  # give up: redelivery finds the jobs final
                    with self._ack_lock:
                        dropped, self._acked = len(self._acked), []
                    log.warning("%d acks not written after %.0f s (their messages come back after the "
                                "visibility timeout, as no-ops): %r", dropped, ACK_RETRY_S, exc)
                    failing_since = None
                else:
                    self._ack_ready.set()
                    time.sleep(0.5)
            except Exception as exc:  # not a Redis error: stop; the next ack starts a new flusher
                log.warning("ack flusher stopped: %r", exc)
                with self._ack_lock:
                    self._flusher = None
                return


BULK_POP_MAX = 64
"""Most messages one bulk pop takes (it never takes more than the free prefetch room)."""

BURST_PREFIX = "llmos:burst:"
"""`llmos:burst:<token>`: the delivery tags one bulk pop recorded, kept until the next pop of the
channel deletes it (or it expires), so a channel whose reply was lost can put them back."""

FAULT_DROP_POP_REPLY_ENV = "LLMOS_FAULT_DROP_POP_REPLY"
"""Fault injection for the fault tests: the first N bulk pops that popped a message raise
`redis.ConnectionError` after the script ran, as if the reply was lost. Unset in production."""

_drop_pop_replies = int(os.environ.get(FAULT_DROP_POP_REPLY_ENV) or 0)  # read once at start-up

_BULK_POP = """
-- KEYS: the queue's lists in priority order, then unacked_index, unacked, pending set, held set,
--       this pop's burst key, the channel's previous burst key (its reply arrived: deleted)
-- ARGV: room (messages), now, task name, burst key expiry (s), id room (job ids; 0: no bound)
-- A message's job ids are read from its argsrepr, "['id']" or "[['id', 'id', ...]]", and only
-- when the ids rebuild the argsrepr exactly (a truncated one is left to the Python side).
local n = #KEYS - 6
local index, hash, pending, held = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
local burst = KEYS[n + 5]
redis.call('DEL', KEYS[n + 6])
local room, now, task = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local id_room = tonumber(ARGV[5]) or 0
local out = {}
local taken, ids_taken = 0, 0
local function ids_of(repr)
  local inner = string.match(repr, "^%[%[(.*)%]%]$")
  local nested = inner ~= nil
  if not nested then inner = string.match(repr, "^%[(.*)%]$") end
  if not inner then return {} end
  local ids = {}
  for id in string.gmatch(inner, "'([%w%-]+)'") do ids[#ids + 1] = id end
  if #ids == 0 or (not nested and #ids ~= 1) then return {} end
  if "'" .. table.concat(ids, "', '") .. "'" ~= inner then return {} end
  return ids
end
local function pop(key)
  while taken < room and (id_room <= 0 or ids_taken < id_room) do
    local item = redis.call('RPOP', key)
    if not item then return true end
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg.properties
    if type(props) ~= 'table' or type(props.delivery_tag) ~= 'string' then
      redis.call('RPUSH', key, item)  -- not one we can record: kombu's own path takes it
      return false
    end
    local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
    redis.call('ZADD', index, now, props.delivery_tag)
    redis.call('HSET', hash, props.delivery_tag, '[' .. item .. ',' .. cjson.encode(info.exchange or '')
               .. ',' .. cjson.encode(info.routing_key or '') .. ']')
    redis.call('RPUSH', burst, props.delivery_tag)
    if taken == 0 then redis.call('EXPIRE', burst, ARGV[4]) end
    local ids = {}
    local h = msg.headers
    if type(h) == 'table' and h.task == task and type(h.argsrepr) == 'string' then
      ids = ids_of(h.argsrepr)
      for _, id in ipairs(ids) do
        redis.call('SREM', pending, id)
        redis.call('SADD', held, id)
      end
    end
    out[#out + 1] = key
    out[#out + 1] = item
    out[#out + 1] = table.concat(ids, ',')
    taken = taken + 1
    ids_taken = ids_taken + math.max(1, #ids)
  end
  return true
end
for i = 1, n do
  if not pop(KEYS[i]) then break end
end
return out
"""


class Channel(kombu_redis.Channel):
    QoS = QoS
    _llmos_client = None
    _bulk_pop = None

    def __init__(self, *args, **kwargs) -> None:
        self._no_ack_queues: set[str] = set()
        self._burst_key = BURST_PREFIX + uuid.uuid4().hex  # the last bulk pop whose reply arrived
        self._lost_bursts: list[str] = []  # bulk pops whose reply was lost, oldest first
        self._sweeping = threading.local()  # set while this thread runs a visibility-timeout sweep
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

    def basic_consume(self, queue, *args, **kwargs):
        no_ack = kwargs.get("no_ack", args[0] if args else False)
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _brpop_read(self, **options):
        """kombu's one-message BRPOP, then (on a worker) a bulk pop of up to the free prefetch room.

        One Lua script pops the messages in priority order and, for each, writes kombu's
        `unacked` record and moves the job pending → held, as `QoS.append` would: two round trips
        for a burst of messages instead of two per message.
        """
        if self._lost_bursts:
            self._recover_bursts()
        delivered = super()._brpop_read(**options)
        if delivered and self.llmos_take is not None and not self._closing and not self.global_keyprefix:
            self._pop_more()
        return delivered

    def _pop_more(self) -> None:
        room = self.qos.can_consume_max_estimate()
        room = BULK_POP_MAX if room is None else min(room, BULK_POP_MAX)
        id_room = self.qos.id_room()
        if id_room is not None and id_room <= 0:
            return
        # our queues only, and only where every delivery is acked (else `unacked` would fill up)
        queues = [q for q in self.active_queues if q.startswith(QUEUE_PREFIX) and q not in self._no_ack_queues]
        if room <= 0 or not queues:
            return
        client = self.client_for_commands()
        if self._bulk_pop is None:
            self._bulk_pop = client.register_script(_BULK_POP)
        keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
        take = self.llmos_take
        burst_key = BURST_PREFIX + uuid.uuid4().hex
        try:
            out = self._bulk_pop(keys=[*keys, self.unacked_index_key, self.unacked_key, take["pending"],
                                       take["held"], burst_key, self._burst_key],
                                 args=[room, time.time(), RUN_JOB_TASK, max(1, int(self.visibility_timeout)),
                                       id_room or 0],
                                 client=client)
            _maybe_drop_reply(out)
        except (redis.RedisError, OSError) as exc:
            # The script may have run, and its messages be recorded and taken, delivered to nobody:
            # the burst key says which; they go back to their lists (now, or on a later read).
            log.warning("bulk pop failed: %r", exc)
            self._lost_bursts.append(burst_key)
            self._recover_bursts()
            return
        self._burst_key = burst_key
        burst, missed = [], []
        for i in range(0, len(out), 3):
            key, item, taken = (x.decode() if isinstance(x, bytes) else x for x in out[i:i + 3])
            payload = loads(item)
            # the script read the ids from argsrepr; where it could not, they are taken here
            job_ids = taken.split(",") if taken else job_ids_of_payload(payload)
            if not taken:
                missed.extend(job_ids)
            queue = key if key in queues else key.rsplit(self.sep, 1)[0]
            burst.append((payload["properties"]["delivery_tag"], payload, queue, max(1, len(job_ids))))
        if missed:
            pipe = client.pipeline()
            pipe.srem(take["pending"], *missed)
            pipe.sadd(take["held"], *missed)
            pipe.execute()
        for n, (tag, payload, queue, count) in enumerate(burst):
            self.qos.prerecorded[tag] = count
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                # The rest of the burst never reached the consumer: put it back in its lists (in
                # pop order, so RPUSH restores it), its jobs pending again, before the error goes up.
                undelivered = [t for t, _, _, _ in burst[n:] if t not in self.qos._delivered]
                for t in reversed(undelivered):
                    self.qos.restore_by_tag(t)
                raise
            finally:
                self.qos.prerecorded.pop(tag, None)

    def _recover_bursts(self) -> None:
        """Put back the messages of bulk pops whose reply was lost (recorded, never delivered).

        Each goes back to its list through kombu's `restore_by_tag` (so its job is pending
        again and out of this worker's held set); a Redis error leaves the rest for the next read.
        """
        client = self.client_for_commands()
        while self._lost_bursts:
            burst_key = self._lost_bursts[0]
            try:
                tags = [t.decode() if isinstance(t, bytes) else t for t in client.lrange(burst_key, 0, -1)]
                undelivered = [t for t in tags if t not in self.qos._delivered]
                for tag in reversed(undelivered):  # RPUSH restores pop order
                    self.qos.restore_by_tag(tag, client)
                client.delete(burst_key)
            except (redis.RedisError, OSError) as exc:
                log.warning("lost bulk pop not recovered yet: %r", exc)
                return
            self._lost_bursts.pop(0)
            log.warning("lost bulk pop recovered: %d messages put back", len(undelivered))

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        """kombu puts a message back in its queue: its job is pending again, and held by nobody
        here. A visibility-timeout sweep restores any worker's messages: it leaves every held set
        alone (a dead holder's set is deleted by the reconciler; a live holder that no longer
        has the job in hand drops it at its next held-set audits, `workers.worker`)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        job_ids = job_ids_of_payload(payload)
        queue = str(routing_key or "")
        if job_ids and queue.startswith(QUEUE_PREFIX):
            pipe.sadd(PENDING_SET_PREFIX + queue[len(QUEUE_PREFIX):], *job_ids)
            if self.llmos_take and not getattr(self._sweeping, "active", False):
                pipe.srem(self.llmos_take["held"], *job_ids)

    def close(self) -> None:
        if self._lost_bursts and not self.closed:
            self._recover_bursts()
        qos = self._qos
        if qos is not None and not self.closed:
            try:
                qos.close()
            except Exception as exc:  # Redis is gone: the messages come back after the visibility timeout
                log.warning("acks not written at close: %r", exc)
        super().close()


def _maybe_drop_reply(out: Any) -> None:
    """The LLMOS_FAULT_DROP_POP_REPLY hook: lose this reply if it carried messages."""
    global _drop_pop_replies
    if _drop_pop_replies > 0 and out:
        _drop_pop_replies -= 1
        raise redis.ConnectionError("injected fault: the bulk pop's reply was lost")


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> str:
    """Make `llmos-redis://` URLs resolve to this transport (idempotent); returns the scheme."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
    return SCHEME


register()
