"""Token streams: the text a worker generates for a job, published piece by piece as it is made.

A job somebody listens to gets its text published on the Redis pub/sub channel
`stream_channel(job_id)` while the model generates: the worker asks Redis once per batch which of
its jobs' channels have a subscriber (`listened`: one PUBSUB NUMSUB), so a job nobody streams
costs nothing, and a client that wants the stream subscribes before it submits. The publisher is
the worker's runner (the transformers generation loop, or the `openai` engine relaying a remote
server's stream).

Messages are JSON: `{"a": attempt, "i": n, "delta": "text"}` with n = 0, 1, 2... within the
job's attempt (`Job.attempts` on the worker that runs it), then `{"a": attempt, "i": n, "end":
true}` once that attempt's text is final: the runner's outcome for the job is a result. An
attempt that fails (a remote server's 503 mid-stream, out of memory, a crash) publishes no
`end`: the job may run again, as a new attempt that numbers its pieces from 0 again, on this
worker or another, and with temperature > 0 its text may differ.

A stream is a hint, like a completion notice (llmos.notify): a subscriber that joins late, or
loses a message (pub/sub keeps nothing), still ends with the whole text, because the job's
recorded result is the truth. `Relay` is the subscriber's side: it relays the pieces in order,
drops those of an older attempt than one already seen, sends a newer attempt's text only past
what was already sent (and nothing more of it once it differs), and once the job is final says
what the pieces did not cover (`Relay.rest`), or None when the recorded text does not start with
what was sent: the client then must be told the stream was wrong, not left with a short text.
Nothing here writes job state.
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

    def __init__(self, client: redis.Redis, job_id: str, attempt: int) -> None:
        self.client, self.job_id, self.seq, self.broken = client, str(job_id), 0, False
        self.attempt = int(attempt)  # the job's attempt this worker runs (Job.attempts)
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
            self._publish({"a": self.attempt, "i": self.seq, "delta": text})

    def end(self) -> None:
        """Say that this attempt's text is final: call it only once the job's outcome is a result
        (a failed attempt ends nothing: the job may run again). Once; nothing is published after."""
        if not self.ended:
            self.ended = True
            self._publish({"a": self.attempt, "i": self.seq, "end": True})


def parse_message(data: bytes | str) -> dict[str, Any] | None:
    """One stream message as published, or None if it is not one of ours."""
    try:
        message = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    if any(not isinstance(message.get(k), int) or isinstance(message.get(k), bool) for k in ("a", "i")):
        return None
    if not (isinstance(message.get("delta"), str) or message.get("end") is True):
        return None
    return message


def remainder(received: str, final: str) -> str | None:
    """What a subscriber still has to send once the job's recorded text is `final`, having sent
    `received`: the rest of it, or None when `final` does not start with `received` (the
    pieces sent were not the recorded text's beginning: never expected, since an attempt's pieces
    are its final text's beginning and `Relay` sends nothing past a difference between attempts,
    but if it happens the subscriber must say the stream was wrong rather than end it short)."""
    return final[len(received):] if final.startswith(received) else None


class Relay:
    """A subscriber's view of one job's stream: what was sent to the client, what to send next."""

    def __init__(self) -> None:
        self.sent = ""  # every piece sent to the client, joined
        self.attempt: int | None = None  # the newest attempt seen
        self.text = ""  # that attempt's pieces, joined, as far as they came in order
        self.seq = 0  # the next piece number expected of that attempt
        self.ended = False  # that attempt said its text is final

    def feed(self, message: dict[str, Any]) -> str:
        """The text to send the client now for one parsed message ("" for nothing)."""
        attempt = message["a"]
        if self.attempt is not None and attempt < self.attempt:
            return ""  # an older attempt's piece, arriving late
        if self.attempt is None or attempt > self.attempt:
            self.attempt, self.text, self.seq, self.ended = attempt, "", 0, False
        if message["i"] != self.seq:  # a lost or repeated piece: `rest` covers the gap
            return ""
        self.seq += 1
        if message.get("end"):
            self.ended = True
            return ""
        self.text += message["delta"]
        if len(self.text) > len(self.sent) and self.text.startswith(self.sent):
            new, self.sent = self.text[len(self.sent):], self.text
            return new
        return ""  # a retry catching up with what was sent, or one whose text differs

    def rest(self, final: str) -> str | None:
        """What is left to send once the recorded text is `final`; None if the stream was wrong."""
        return remainder(self.sent, final)
