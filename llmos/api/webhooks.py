"""Webhooks: which URLs may receive them, how they are signed, and the Deliverer that POSTs them.

Owns the address policy (`check_url`, at submit and again before every POST, so a name that
now resolves to a private address, DNS rebinding, is refused; the POST then goes to the very
address checked), the signature (`sign`, `verify`), the payloads, and `Deliverer`, the thread
each API process runs to claim due deliveries, POST them and record the outcome. The rows
(`webhook_deliveries`, `webhook_secrets`) are read and written through `llmos.manager`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.cookiejar
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import httpx
import sqlalchemy as sa

from llmos import __version__, manager
from llmos.api.schemas import JobOut
from llmos.api.settings import ApiSettings
from llmos.errors import LLMOSError, ValidationError
from llmos.jobs import FINAL_STATUSES
from llmos.logs import event
from llmos.manager import WEBHOOK_JOB, Delivery
from llmos.sdk import webhook_url_of

log = logging.getLogger("llmos.api.webhooks")

SIGNATURE_HEADER = "X-LLMOS-Signature"
"""`v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the tenant's secret>` (several, comma-separated, may come)."""
TIMESTAMP_HEADER = "X-LLMOS-Timestamp"
"""Unix seconds when the attempt was signed; receivers refuse old ones (replays)."""
DELIVERY_HEADER = "X-LLMOS-Delivery"
"""The delivery's id, the same on every retry: receivers dedupe on it."""
EVENT_HEADER = "X-LLMOS-Event"
"""`job` (the body is the job, as GET /v1/jobs/{id} shows it) or `batch` (the batch summary)."""

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
"""How old a timestamp `verify` accepts by default."""

MAX_ADDRESSES_TRIED = 3
"""Addresses of a host one attempt tries in turn when a connection cannot be made."""

Resolver = Callable[[str, int], list[str]]
"""(host, port) → its addresses; OSError when the name does not resolve."""


# -- signing -------------------------------------------------------------------------------
def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-LLMOS-Signature value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret: str, body: bytes, timestamp: str | None, signature: str | None, *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """Whether a request's headers sign `body` with `secret`, within `tolerance_s` of `now`.

    What a receiver runs (docs/api.md shows the same in a few lines): the body as received,
    byte for byte, before any JSON parsing.
    """
    if not timestamp or len(timestamp) > 12 or not timestamp.isascii() or not timestamp.isdigit():
        return False
    ts = int(timestamp)
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body).encode()
    return any(hmac.compare_digest(expected, part.strip().encode("utf-8", "replace"))
               for part in (signature or "").split(","))


# -- the address policy --------------------------------------------------------------------
RESOLVE_TIMEOUT_S = 3.0
"""How long a webhook host's name may take to resolve (getaddrinfo has no timeout of its own)."""
_resolver = ThreadPoolExecutor(4, thread_name_prefix="llmos-webhook-dns")


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order; OSError past RESOLVE_TIMEOUT_S.

    Resolution runs on a small pool of its own, so a slow name server holds those threads, not
    the API's request threads.
    """
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=RESOLVE_TIMEOUT_S)
    except TimeoutError:
        raise OSError(f"no answer from the resolver within {RESOLVE_TIMEOUT_S:g} s") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refused_reason(address: str) -> str | None:
    """Why a webhook may not go to `address` ("loopback", "private", ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address inside an IPv6 one is judged as IPv4
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    for reason, flag in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return reason
    return None if ip.is_global else "non-public"


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the addresses it may be POSTed to."""

    url: str
    host: str
    addresses: tuple[str, ...]


def check_url(url: str, *, allow_private: bool, resolve: Resolver = system_resolve) -> Target:
    """`url` checked: an http(s) URL whose host resolves to public addresses only (ValidationError else).

    Every address the name resolves to must be public, unless `allow_private`
    (LLMOS_API_WEBHOOK_ALLOW_PRIVATE). Messages never show the addresses (no probing of
    internal names through error messages).
    """
    checked = webhook_url_of(url)
    if checked is None:
        raise ValidationError("webhook_url is required here")
    try:
        httpx.URL(checked)  # what the POST will parse: refuse now what it would refuse on every try
    except httpx.InvalidURL as exc:
        raise ValidationError(f"webhook_url is not a URL the deliverer can use: {exc}") from None
    parts = urllib.parse.urlsplit(checked)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = tuple(resolve(host, port))
    except (OSError, UnicodeError):
        addresses = ()
    if not addresses:
        raise ValidationError(f"webhook_url host {host[:100]!r} does not resolve to an address")
    if not allow_private:
        for address in addresses:
            reason = refused_reason(address)
            if reason is not None:
                raise ValidationError(
                    f"webhook_url host {host[:100]!r} resolves to a {reason} address; webhooks go to public "
                    "addresses only (the operator may allow others with LLMOS_API_WEBHOOK_ALLOW_PRIVATE=true)")
    return Target(url=checked, host=host, addresses=addresses)


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Wait after the `attempts`-th failed attempt: base × 2^(attempts − 1), at most `max_s`."""
    return min(max_s, base_s * 2.0 ** min(max(attempts - 1, 0), 60))


# -- the payloads --------------------------------------------------------------------------
def payload(engine: sa.Engine, delivery: Delivery) -> bytes:
    """The body of a delivery: the final job as the API shows it, or the batch's summary."""
    if delivery.kind == WEBHOOK_JOB:
        job = manager.get_job(engine, delivery.job_id, tenant=delivery.tenant)
        if job is None:
            raise LookupError(f"job {delivery.job_id} no longer exists")
        return JobOut.of(job).model_dump_json().encode()
    counts = manager.batch_status_counts(engine, delivery.batch_id, tenant=delivery.tenant)
    ids = manager.batch_job_ids(engine, delivery.batch_id, tenant=delivery.tenant)
    summary = {"batch_id": delivery.batch_id, "total": len(ids),
               "counts": {s.value: counts.get(s, 0) for s in sorted(FINAL_STATUSES)}, "job_ids": ids}
    return json.dumps(summary, separators=(",", ":")).encode()


# -- delivery ------------------------------------------------------------------------------
class Deliverer:
    """A thread that POSTs due webhooks: claim (leased rows), POST outside any transaction, record.

    Several API processes each run one; the claim splits rows between them. A delivery is
    at least once: a process killed mid-POST leaves a lease that passes, and the row is tried
    again (receivers dedupe on X-LLMOS-Delivery).
    """

    def __init__(self, engine: Callable[[], sa.Engine], api: ApiSettings, *,
                 resolve: Resolver = system_resolve, transport: httpx.BaseTransport | None = None) -> None:
        """`engine`: returns the task table's engine (called each poll); `resolve`, `transport`: for tests."""
        self._engine = engine
        self.api = api
        self._resolve = resolve
        # no redirects (one could lead to a private address), no proxy from the environment (the
        # POST goes to the checked address), no kept connections (each is made for its own host
        # name), no cookies (receivers on one address would share them)
        self._transport = transport
        self._pool = ThreadPoolExecutor(api.webhook_concurrency, thread_name_prefix="llmos-webhook")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def attempt_deadline_s(self) -> float:
        """The most one attempt may take, all addresses tried included (a receiver that drips its
        answer byte by byte is cut off here: httpx's timeouts count per read, not per request)."""
        return MAX_ADDRESSES_TRIED * self.api.webhook_timeout_s

    @property
    def lease_s(self) -> float:
        """How long a claimed row is this process's: well past the longest an attempt may take, so
        no other process tries it while this one still may."""
        return 60.0 + 2 * self.attempt_deadline_s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmos-webhook-deliverer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and wait for the POSTs in flight (each ends within its timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 2 * self.lease_s)
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.run_once()
            except Exception as exc:  # the database down, say: keep polling (the thread must not die)
                event(log, "webhook_poll_failed", logging.WARNING, error=type(exc).__name__,
                      message=" ".join(str(exc).split())[:200])
                claimed = 0
            if claimed < self.api.webhook_concurrency:  # a full claim: more may be due at once
                self._stop.wait(self.api.webhook_poll_s)

    def run_once(self) -> int:
        """Claim up to `webhook_concurrency` due deliveries and attempt each; returns how many."""
        claimed = manager.claim_deliveries(self._engine(), limit=self.api.webhook_concurrency, lease_s=self.lease_s)
        list(self._pool.map(self.attempt, claimed))
        return len(claimed)

    def attempt(self, delivery: Delivery) -> str:
        """One attempt at a claimed delivery; returns its outcome (manager.record_delivery's, or 'error')."""
        engine = self._engine()
        status: int | None = None
        try:
            body = payload(engine, delivery)
            secret, _ = manager.webhook_secret(engine, delivery.tenant)
            target = check_url(delivery.url, allow_private=self.api.webhook_allow_private, resolve=self._resolve)
            status, error = self._post(target, delivery, body, secret)
        except (ValidationError, LookupError, httpx.InvalidURL) as exc:
            error = f"refused: {exc}"
        except (LLMOSError, sa.exc.SQLAlchemyError) as exc:  # the lease passes and the row is tried again
            event(log, "webhook_attempt_failed", logging.WARNING, delivery=delivery.id, error=type(exc).__name__)
            return "error"
        delivered = status is not None and 200 <= status < 300
        try:
            outcome = manager.record_delivery(
                engine, delivery, delivered=delivered, status=status, error=None if delivered else error,
                retry_in_s=backoff_s(delivery.attempts + 1, self.api.webhook_backoff_base_s,
                                     self.api.webhook_backoff_max_s),
                give_up_after_s=self.api.webhook_give_up_after_s)
        except sa.exc.SQLAlchemyError as exc:  # delivered but not recorded: tried again after the lease
            event(log, "webhook_record_failed", logging.WARNING, delivery=delivery.id, error=type(exc).__name__)
            return "error"
        level = logging.INFO if outcome in ("delivered", "retry") else logging.WARNING
        event(log, f"webhook_{outcome}", level, delivery=delivery.id, tenant=delivery.tenant, kind=delivery.kind,
              target=delivery.target_id, attempt=delivery.attempts + 1, status=status,
              **({} if delivered else {"error": " ".join((error or "").split())[:200]}))
        return outcome

    def _post(self, target: Target, delivery: Delivery, body: bytes, secret: str) -> tuple[int | None, str | None]:
        """POST `body` to `target`'s checked addresses in turn, within `attempt_deadline_s`:
        (HTTP status or None, error or None). Cancelling at the deadline closes the connection."""
        deadline = self.attempt_deadline_s
        try:
            return asyncio.run(asyncio.wait_for(self._apost(target, delivery, body, secret), deadline))
        except TimeoutError:
            return None, f"no complete answer within {deadline:g} s"

    async def _apost(self, target: Target, delivery: Delivery, body: bytes,
                     secret: str) -> tuple[int | None, str | None]:
        timestamp = int(time.time())  # the receiver compares it with its own clock
        url = httpx.URL(target.url)
        headers = {"Host": url.netloc.decode("ascii"), "Content-Type": "application/json",
                   EVENT_HEADER: delivery.kind, DELIVERY_HEADER: delivery.id,
                   TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}
        extensions = {"sni_hostname": target.host} if url.scheme == "https" else {}
        # no redirects (one could lead to a private address), no proxy from the environment (the
        # POST goes to the checked address), no kept connections (a client per attempt, made for
        # its own host name), no cookies (receivers on one address would share them)
        no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        error = None
        async with httpx.AsyncClient(transport=self._transport, timeout=self.api.webhook_timeout_s,
                                     follow_redirects=False, trust_env=False, cookies=no_cookies,
                                     limits=httpx.Limits(max_keepalive_connections=0),
                                     headers={"User-Agent": f"LLMOS-Webhooks/{__version__}"}) as client:
            for address in target.addresses[:MAX_ADDRESSES_TRIED]:
                try:
                    async with client.stream("POST", url.copy_with(host=address), content=body,
                                             headers=headers, extensions=extensions) as resp:
                        if resp.is_success:
                            return resp.status_code, None
                        head = b""
                        async for chunk in resp.aiter_bytes(200):
                            head = chunk[:200]
                            break
                        text = " ".join(head.decode("utf-8", "replace").split())
                        if refused_reason(address) is not None:  # allowed private: keep its body out of the table
                            text = ""
                        return resp.status_code, f"HTTP {resp.status_code}: {text}".rstrip(": ")
                except httpx.ConnectError as exc:  # nothing was sent: the next address may answer
                    error = f"cannot connect: {str(exc) or type(exc).__name__}"
                except httpx.HTTPError as exc:
                    return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None, error
