"""Token streams: the text a worker generates for a job, published piece by piece as it is made.

A job somebody listens to gets its text published on the Redis pub/sub channel
`stream_channel(job_id)` while the model generates: the worker asks Redis once per batch which of
its jobs' channels have a subscriber (`listened`: one PUBSUB NUMSUB), so a job nobody streams
costs nothing, and a client that wants the stream subscribes before it submits. One message per
piece, JSON `{"i": n, "delta": "text"}` with n = 0, 1, 2..., then `{"i": n, "end": true}` once
the worker has nothing more to add. The publisher is the worker's runner (the transformers
generation loop, or the `openai` engine relaying a remote server's stream).

A stream is a hint, like a completion notice (llmos.notify): a subscriber that joins late, or
loses a message (pub/sub keeps nothing), still ends with the whole text, because the job's
recorded result is the truth: it reads the job once it is final and sends whatever the pieces it
received did not cover (`remainder`). Nothing here writes job state.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from llmos.constants import STREAM_CHANNEL_PREFIX
from llmos.logs import event

log = logging.getLogger("llmos.streaming")


def stream_channel(job_id: str) -> str:
    """The pub/sub channel of one job's token stream."""
    return f"{STREAM_CHANNEL_PREFIX}{job_id}"


def listened(client: redis.Redis, job_ids: list[str]) -> set[str]:
    """The ids among `job_ids` whose stream channel has a subscriber now (one round trip); none
    when Redis does not answer (the jobs then run unstreamed, their results recorded as ever)."""
    if not job_ids:
        return set()
    try:
        counts = client.pubsub_numsub(*(stream_channel(j) for j in job_ids))
    except (redis.RedisError, OSError) as exc:
        event(log, "stream_check_failed", logging.WARNING, error=repr(exc)[:200])
        return set()
    prefix = len(STREAM_CHANNEL_PREFIX)
    return {(ch.decode() if isinstance(ch, bytes) else ch)[prefix:] for ch, n in counts if n}


class TokenPublisher:
    """Publishes one job's pieces in order; a Redis error stops the stream, never the job.

    The job's result is recorded whatever happens here, and a subscriber falls back to it.
    """

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client, self.job_id, self.seq, self.broken = client, str(job_id), 0, False
        self.channel = stream_channel(self.job_id)
        self.text = ""  # every piece given so far, joined (a rerun of the batch continues from it)
        self.ended = False

    def _publish(self, message: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            self.client.publish(self.channel, json.dumps(message, separators=(",", ":")))
        except (redis.RedisError, OSError) as exc:
            self.broken = True
            event(log, "stream_publish_failed", logging.WARNING, job_id=self.job_id, error=repr(exc)[:200])
            return
        self.seq += 1

    def delta(self, text: str) -> None:
        """Publish the next piece of text (an empty piece is not sent)."""
        if text and not self.ended:
            self.text += text
            self._publish({"i": self.seq, "delta": text})

    def end(self) -> None:
        """Say that the worker will publish nothing more for this job (once)."""
        if not self.ended:
            self.ended = True
            self._publish({"i": self.seq, "end": True})


def parse_message(data: bytes | str) -> dict[str, Any] | None:
    """One stream message as published, or None if it is not one of ours."""
    try:
        message = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("i"), int):
        return None
    if not (isinstance(message.get("delta"), str) or message.get("end") is True):
        return None
    return message


def remainder(received: str, final: str) -> str:
    """What a subscriber still has to send once the job's recorded text is `final`: the rest of it
    when the pieces received are its beginning, else nothing (pieces arrived that the final text
    does not start with: a stop sequence trimmed after them; the stream then says less than the
    result, never more than the worker made)."""
    return final[len(received):] if final.startswith(received) else ""
