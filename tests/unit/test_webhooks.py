"""Webhooks without a network: signing, the URL policy, backoff, and the Deliverer on SQLite.

The receiver is an httpx MockTransport; the resolver is a fake, so the address checks are the
ones a real name would meet. The real-HTTP, Postgres and crash cases are in
tests/integration/test_webhooks.py.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from llmos import manager
from llmos.api import create_app
from llmos.api.schemas import JobOut
from llmos.api.settings import ApiSettings
from llmos.api.webhooks import (DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
                                Deliverer, backoff_s, check_url, refused_reason, sign, verify)
from llmos.db import get_engine, jobs, webhook_deliveries
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import ValidationError
from llmos.manager import NewJob
from llmos.sdk import Client

pytestmark = pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")

PUBLIC = "93.184.215.14"
NAMES = {"hooks.example.com": [PUBLIC], "v6.example.com": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
         "localhost": ["127.0.0.1", "::1"], "internal.example.com": ["10.1.2.3"],
         "mixed.example.com": [PUBLIC, "192.168.0.7"], "metadata.example.com": ["169.254.169.254"],
         "two.example.com": [PUBLIC, "93.184.215.15"]}


def resolve(host: str, port: int) -> list[str]:
    """A fake resolver: NAMES, IP literals as themselves, anything else does not resolve."""
    if host in NAMES:
        return NAMES[host]
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        raise OSError(f"cannot resolve {host}") from None


# -- signing -------------------------------------------------------------------------------
def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"id":"x","status":"succeeded"}'
    expected = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("whsec_k", 1700000000, body) == f"v1={expected}"


def test_verify_accepts_the_signature_and_nothing_else():
    now = time.time()
    ts = int(now)
    body = b'{"a": 1}'
    sig = sign("s3cret", ts, body)
    assert verify("s3cret", body, str(ts), sig, now=now)
    assert verify("s3cret", body, str(ts), f"v1=deadbeef, {sig}", now=now)  # one of several (rotation)
    assert not verify("other", body, str(ts), sig, now=now)
    assert not verify("s3cret", body + b" ", str(ts), sig, now=now)
    assert not verify("s3cret", body, str(ts + 1), sig, now=now)  # the timestamp is signed
    assert not verify("s3cret", body, str(ts), sig, now=now + 301)  # too old: a replay
    assert not verify("s3cret", body, "yesterday", sig, now=now)
    assert not verify("s3cret", body, None, None, now=now)


# -- the URL policy ------------------------------------------------------------------------
@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "private"), ("100.64.0.1", "non-public"), ("::ffff:127.0.0.1", "loopback"),
    ("fc00::1", "private"), (PUBLIC, None), ("2606:4700:4700::1111", None), ("8.8.8.8", None)])
def test_refused_addresses(address, reason):
    assert refused_reason(address) == reason


@pytest.mark.parametrize("url, words", [
    ("ftp://hooks.example.com/x", "http:// or https://"), ("file:///etc/passwd", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"), ("hooks.example.com/x", "no scheme"),
    ("http://", "no host"), ("https:///path", "no host"), ("http://hooks.example.com:99999/", "not a valid URL"),
    ("http://hooks.example.com/a b", "whitespace"), ("http://hooks.example.com/\x00", "whitespace"),
    ("https://hooks.example.com/" + "a" * 2048, "2048"), ("", "1–2048"),
    ("https://nowhere.example.com/", "does not resolve"),
    ("http://localhost:8080/hook", "loopback address"), ("http://127.0.0.1/", "loopback address"),
    ("http://[::1]/", "loopback address"), ("https://internal.example.com/", "private address"),
    ("https://mixed.example.com/", "private address"), ("http://metadata.example.com/", "link-local address")])
def test_check_url_refuses(url, words):
    with pytest.raises(ValidationError, match=words) as err:
        check_url(url, allow_private=False, resolve=resolve)
    assert "10.1.2.3" not in str(err.value) and "192.168" not in str(err.value)  # no addresses shown


def test_check_url_accepts_public_and_private_when_allowed():
    t = check_url("https://hooks.example.com/llmos?x=1", allow_private=False, resolve=resolve)
    assert t.host == "hooks.example.com" and t.addresses == (PUBLIC,)
    assert check_url("http://v6.example.com:8080/h", allow_private=False, resolve=resolve).addresses
    assert check_url("HTTPS://Hooks.Example.com/", allow_private=False, resolve=resolve).host == "hooks.example.com"
    assert check_url("http://localhost:9/h", allow_private=True, resolve=resolve).addresses == ("127.0.0.1", "::1")
    with pytest.raises(ValidationError, match="http:// or https://"):  # the setting allows addresses, not schemes
        check_url("ftp://localhost/", allow_private=True, resolve=resolve)


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_s(n, 2.0, 3600.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_s(12, 2.0, 3600.0) == 3600.0 and backoff_s(10_000, 2.0, 3600.0) == 3600.0


# -- the Deliverer on SQLite ---------------------------------------------------------------
class Receiver:
    """An httpx MockTransport handler that records requests and answers from a script."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        return httpx.Response(status, text="" if status < 300 else "<html>boom</html>")


def api_settings(**values) -> ApiSettings:
    base = dict(rate_limit_storage="memory://", webhook_backoff_base_s=0.01, webhook_concurrency=2)
    return ApiSettings(**{**base, **values})


def deliverer(engine, receiver, **values) -> Deliverer:
    return Deliverer(lambda: engine, api_settings(**values), resolve=resolve, transport=httpx.MockTransport(receiver))


def new_job(tenant="acme", batch_id=None, key=None) -> NewJob:
    return NewJob(model="minilm", task_type="sentiment", input={"text": "hi"}, priority=5, tenant=tenant,
                  batch_id=batch_id, idempotency_key=key)


def finish(engine, job_id):
    assert manager.cancel(engine, job_id, tenant=manager.ANY_TENANT)  # any final state will do


def rows(engine):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(webhook_deliveries))]


def drain(d: Deliverer, until, timeout=10.0):
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "deliveries not done in time"
        d.run_once()
        time.sleep(0.01)


@pytest.fixture
def engine(sqlite_settings):
    return get_engine(sqlite_settings.db_url)


def test_job_webhook_waits_for_the_final_state_then_posts_it_signed(engine):
    url = "https://hooks.example.com/llmos?src=test"
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url=url)
    receiver = Receiver()
    d = deliverer(engine, receiver)
    try:
        assert d.run_once() == 0 and receiver.requests == []  # queued: not due
        finish(engine, job.id)
        assert d.run_once() == 1
    finally:
        d.stop()
    req, = receiver.requests
    assert req.url.host == PUBLIC and req.url.scheme == "https" and req.url.query == b"src=test"
    assert req.headers["host"] == "hooks.example.com"  # sent to the checked address, for the name
    assert req.extensions["sni_hostname"] == "hooks.example.com"
    secret, _ = manager.webhook_secret(engine, "acme")
    assert secret.startswith("whsec_")
    assert verify(secret, req.content, req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER])
    assert req.headers[EVENT_HEADER] == "job" and req.headers["content-type"] == "application/json"
    final = manager.get_job(engine, job.id, tenant="acme")
    assert json.loads(req.content) == json.loads(JobOut.of(final).model_dump_json())
    row, = rows(engine)
    assert req.headers[DELIVERY_HEADER] == str(row["id"])
    assert row["attempts"] == 1 and row["last_status"] == 200 and row["delivered_at"] is not None
    assert row["last_error"] is None


def test_failures_are_retried_with_backoff_then_delivered_once(engine):
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://hooks.example.com/h")
    finish(engine, job.id)
    receiver = Receiver(500, 503)
    d = deliverer(engine, receiver)
    try:
        drain(d, lambda: rows(engine)[0]["delivered_at"] is not None)
        for _ in range(3):
            assert d.run_once() == 0  # delivered: never again
    finally:
        d.stop()
    assert len(receiver.requests) == 3 and len({r.headers[DELIVERY_HEADER] for r in receiver.requests}) == 1
    row, = rows(engine)
    assert row["attempts"] == 3 and row["last_status"] == 200 and row["last_error"] is None


def test_a_failing_receiver_is_given_up_and_says_why(engine):
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://hooks.example.com/h")
    finish(engine, job.id)
    receiver = Receiver(*[500] * 50)
    d = deliverer(engine, receiver, webhook_give_up_after_s=0.3)
    try:
        drain(d, lambda: rows(engine)[0]["given_up_at"] is not None)
    finally:
        d.stop()
    row, = rows(engine)
    assert row["delivered_at"] is None and row["last_status"] == 500 and row["attempts"] >= 2
    assert row["last_error"] == "HTTP 500: <html>boom</html>"


def test_the_next_address_is_tried_when_one_refuses_and_no_answer_is_a_retry(engine):
    (job, _), (other, _) = manager.create_jobs(engine, [new_job(), new_job()], webhook_url="http://two.example.com/h")
    finish(engine, job.id)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == PUBLIC:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, headers={"Set-Cookie": "track=1; Path=/"})

    d = Deliverer(lambda: engine, api_settings(), resolve=resolve, transport=httpx.MockTransport(handler))
    try:
        assert d.run_once() == 1
        assert seen == [PUBLIC, "93.184.215.15"]
    finally:
        d.stop()
    assert rows(engine)[0]["delivered_at"] is not None or rows(engine)[1]["delivered_at"] is not None

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    finish(engine, other.id)
    d = Deliverer(lambda: engine, api_settings(), resolve=resolve, transport=httpx.MockTransport(timeout))
    try:
        assert d.run_once() == 1
    finally:
        d.stop()
    row, = [r for r in rows(engine) if str(r["job_id"]) == other.id]
    assert row["delivered_at"] is None and row["last_status"] is None and row["attempts"] == 1
    assert row["last_error"] == "ReadTimeout: timed out" and row["given_up_at"] is None


def test_rebinding_to_a_private_address_is_refused_at_delivery(engine, monkeypatch):
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://hooks.example.com/h")
    finish(engine, job.id)
    monkeypatch.setitem(NAMES, "hooks.example.com", ["127.0.0.1"])  # accepted at submit, now loopback
    receiver = Receiver()
    d = deliverer(engine, receiver)
    try:
        assert d.run_once() == 1
    finally:
        d.stop()
    row, = rows(engine)
    assert receiver.requests == [] and row["delivered_at"] is None and row["last_status"] is None
    assert row["attempts"] == 1 and "loopback" in row["last_error"]


def test_batch_webhook_fires_once_when_every_job_is_final(engine):
    created = manager.create_jobs(engine, [new_job(batch_id="b1") for _ in range(3)],
                                  webhook_url="https://hooks.example.com/batch")
    ids = [j.id for j, _ in created]
    assert len(rows(engine)) == 1  # one delivery for the batch
    receiver = Receiver()
    d = deliverer(engine, receiver)
    try:
        finish(engine, ids[0])
        finish(engine, ids[1])
        assert d.run_once() == 0  # one job still queued
        with engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == ids[2]).values(status="succeeded"))
        assert d.run_once() == 1
    finally:
        d.stop()
    req, = receiver.requests
    assert req.headers[EVENT_HEADER] == "batch"
    assert json.loads(req.content) == {"batch_id": "b1", "total": 3, "job_ids": sorted(ids), "counts": {
        "cancelled": 2, "expired": 0, "failed": 0, "succeeded": 1}}


def test_claims_are_leased_and_a_stale_lease_records_nothing(engine):
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://hooks.example.com/h")
    finish(engine, job.id)
    first, = manager.claim_deliveries(engine, limit=10, lease_s=60)
    assert manager.claim_deliveries(engine, limit=10, lease_s=60) == []  # leased to the first caller
    assert first.next_attempt_at > first.created_at
    assert manager.record_delivery(engine, first, delivered=True, status=204, error=None,
                                   retry_in_s=1, give_up_after_s=60) == "delivered"
    assert manager.record_delivery(engine, first, delivered=True, status=204, error=None,
                                   retry_in_s=1, give_up_after_s=60) == "lost"  # already recorded
    assert rows(engine)[0]["attempts"] == 1


def test_deliveries_are_written_with_the_jobs_and_once_per_idempotent_submit(engine):
    url = "https://hooks.example.com/h"
    manager.create_jobs(engine, [new_job(key="k1")], webhook_url=url)
    manager.create_jobs(engine, [new_job(key="k1")], webhook_url=url)  # the same job: no second webhook
    manager.create_jobs(engine, [new_job(key="k2"), new_job(key="k3")], webhook_url=url)  # no batch: one each
    manager.create_jobs(engine, [new_job(tenant="t2", batch_id="b"), new_job(tenant="t2", batch_id="b")],
                        webhook_url=url)
    kinds = sorted((r["tenant"], r["kind"]) for r in rows(engine))
    assert kinds == [("acme", "job")] * 3 + [("t2", "batch")]
    bad = NewJob(model="minilm", task_type="sentiment", input={}, priority=99)  # the table refuses it
    with pytest.raises(sa.exc.IntegrityError):  # one transaction: a refused job writes no delivery
        manager.create_jobs(engine, [new_job(), bad], webhook_url=url)
    assert len(rows(engine)) == 4


def test_secrets_are_per_tenant_and_rotate(engine):
    a, a_at = manager.webhook_secret(engine, "acme")
    assert manager.webhook_secret(engine, "acme") == (a, a_at)
    b, _ = manager.webhook_secret(engine, "globex")
    assert a != b
    rotated, _ = manager.rotate_webhook_secret(engine, "acme")
    assert rotated not in (a, b) and manager.webhook_secret(engine, "acme")[0] == rotated
    assert manager.webhook_secret(engine, "globex")[0] == b
    assert manager.rotate_webhook_secret(engine, "new-tenant")[0].startswith("whsec_")


# -- the SDK and the API on SQLite ----------------------------------------------------------
def test_sdk_webhook_url(sqlite_settings, engine):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher())
    model = client.load_model("minilm")
    from llmos.tasks import SentimentTask

    model.submit(SentimentTask(text="a"), webhook_url="https://hooks.example.com/one")
    handles = model.submit_many([SentimentTask(text="b"), SentimentTask(text="c")],
                                webhook_url="https://hooks.example.com/many")
    batch_ids = {j.batch_id for j in manager.get_jobs(engine, [h.id for h in handles], tenant="default").values()}
    assert len(batch_ids) == 1 and None not in batch_ids  # a batch id given, for the batch's webhook
    found = sorted((r["kind"], r["url"]) for r in rows(engine))
    assert found == [("batch", "https://hooks.example.com/many"), ("job", "https://hooks.example.com/one")]
    with pytest.raises(ValidationError, match="http:// or https://"):
        model.submit(SentimentTask(text="d"), webhook_url="ftp://hooks.example.com/")
    assert len(rows(engine)) == 2 and manager.queued_count(engine, tenant="default") == 3


@pytest.fixture
def http(sqlite_settings, engine):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher())
    app = create_app(api_settings=api_settings(webhook_deliver=False), client=client)
    _, a = manager.create_api_key(engine, tenant="acme")
    _, b = manager.create_api_key(engine, tenant="globex")
    with TestClient(app) as http:
        yield http, {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}


SENTIMENT = {"model": "minilm", "task": "sentiment", "input": {"text": "lovely"}}


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "example.com/hook",
                                 "http://127.0.0.1:9/h", "http://localhost/h", "http://[::1]/h",
                                 "http://10.0.0.8/h", "http://169.254.169.254/latest", "x" * 3000, 42])
def test_api_refuses_bad_webhook_urls_with_422_and_writes_nothing(http, engine, url):
    client, a, _ = http
    for path, body in (("/v1/jobs", {**SENTIMENT, "webhook_url": url}),
                       ("/v1/jobs:batch", {"model": "minilm", "webhook_url": url,
                                           "jobs": [{"task": "sentiment", "input": {"text": "x"}}]})):
        resp = client.post(path, json=body, headers=a)
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_request" and "webhook_url" in err["message"], err
    assert manager.queued_count(engine, tenant="acme") == 0 and rows(engine) == []


def test_api_accepts_a_private_url_when_allowed_and_lists_deliveries(sqlite_settings, engine):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher())
    app = create_app(api_settings=api_settings(webhook_deliver=False, webhook_allow_private=True), client=client)
    _, a = manager.create_api_key(engine, tenant="acme")
    _, b = manager.create_api_key(engine, tenant="globex")
    a, b = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}
    with TestClient(app) as http:
        job = http.post("/v1/jobs", json={**SENTIMENT, "webhook_url": "http://127.0.0.1:9/h"}, headers=a).json()
        batch = http.post("/v1/jobs:batch", headers=a, json={
            "model": "minilm", "webhook_url": "http://localhost:9/b",
            "jobs": [{"task": "sentiment", "input": {"text": "x"}}] * 2}).json()
        listed = http.get("/v1/webhooks/deliveries", headers=a).json()["deliveries"]
        assert [(d["kind"], d["target_id"]) for d in listed] == [("batch", batch["batch_id"]), ("job", job["id"])]
        assert listed[1]["attempts"] == 0 and listed[1]["last_status"] is None and listed[1]["next_attempt_at"]
        one = http.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}, headers=a).json()["deliveries"]
        assert [d["target_id"] for d in one] == [job["id"]]
        assert http.get("/v1/webhooks/deliveries", params={"job_id": "nope"}, headers=a).json() == {"deliveries": []}
        assert http.get("/v1/webhooks/deliveries", headers=b).json() == {"deliveries": []}  # another tenant's


def test_api_secret_routes_are_per_key_tenant(http):
    client, a, b = http
    sa_ = client.get("/v1/webhooks/secret", headers=a).json()
    assert sa_["secret"].startswith("whsec_") and sa_["created_at"]
    assert client.get("/v1/webhooks/secret", headers=a).json() == sa_
    sb = client.get("/v1/webhooks/secret", headers=b).json()
    assert sb["secret"] != sa_["secret"]
    rotated = client.post("/v1/webhooks/secret:rotate", headers=a)
    assert rotated.status_code == 200 and rotated.json()["secret"] not in (sa_["secret"], sb["secret"])
    assert client.get("/v1/webhooks/secret", headers=a).json()["secret"] == rotated.json()["secret"]
    assert client.get("/v1/webhooks/secret", headers=b).json() == sb
    assert client.get("/v1/webhooks/secret").status_code == 401


def test_a_receiver_slower_than_the_attempt_deadline_is_cut_off_and_retried(engine):
    """httpx's timeouts count per read: a receiver dripping its answer is stopped by the attempt's deadline."""
    import asyncio

    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://hooks.example.com/h")
    finish(engine, job.id)

    async def drip(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # far past the deadline (3 addresses × 0.2 s)
        return httpx.Response(200)

    d = Deliverer(lambda: engine, api_settings(webhook_timeout_s=0.2), resolve=resolve,
                  transport=httpx.MockTransport(drip))
    assert d.attempt_deadline_s < d.lease_s  # no other process retries while an attempt may still run
    started = time.monotonic()
    try:
        assert d.run_once() == 1
    finally:
        d.stop()
    assert time.monotonic() - started < 10
    row, = rows(engine)
    assert row["delivered_at"] is None and row["attempts"] == 1 and row["given_up_at"] is None
    assert row["last_error"] == "no complete answer within 0.6 s"


def test_verify_refuses_headers_a_receiver_cannot_parse_without_raising():
    body, now = b"{}", 1_700_000_000
    assert not verify("s3cret", body, "9" * 400, sign("s3cret", now, body), now=now)  # no OverflowError
    assert not verify("s3cret", body, str(now), "v1=\u00e9\u00e9", now=now)  # non-ASCII: no TypeError
    assert not verify("s3cret", body, "-5", sign("s3cret", now, body), now=now)


def test_an_ipv4_address_inside_a_6to4_address_is_judged_as_ipv4():
    assert refused_reason("2002:a00:1::") == "private"  # embeds 10.0.0.1
    assert refused_reason("2002:7f00:1::") == "loopback"  # embeds 127.0.0.1


def test_an_allowed_private_receivers_answer_is_not_kept_in_the_table(engine):
    """With private addresses allowed, a tenant must not read internal services' bodies through last_error."""
    (job, _), = manager.create_jobs(engine, [new_job()], webhook_url="http://internal.example.com/h")
    finish(engine, job.id)
    d = deliverer(engine, Receiver(500), webhook_allow_private=True)
    try:
        assert d.run_once() == 1
    finally:
        d.stop()
    row, = rows(engine)
    assert row["last_status"] == 500 and row["last_error"] == "HTTP 500"
