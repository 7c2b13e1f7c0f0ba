"""Webhooks over real HTTP: uvicorn API processes, a real minilm worker, Postgres, and a receiver on loopback.

Each test starts the API processes it needs (their deliverers would otherwise deliver each
other's rows), so the crash test can kill one between a job's end and its delivery.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import llmos
from llmos import manager
from llmos.api.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from llmos.db import get_engine, webhook_deliveries
from llmos.errors import ValidationError
from llmos.tasks import SentimentTask
from tests import helpers
from tests.integration.test_api import ApiProcess, assert_error, new_key

pytestmark = pytest.mark.integration

FAST = dict(LLMOS_API_WEBHOOK_ALLOW_PRIVATE="true", LLMOS_API_WEBHOOK_POLL_S="0.2",
            LLMOS_API_WEBHOOK_BACKOFF_BASE_S="0.5")
"""An API process that may POST to the loopback receiver, polls often and retries quickly."""


@dataclass(frozen=True)
class Hit:
    path: str
    headers: Message
    body: bytes
    at: float


class Receiver:
    """An HTTP server on loopback recording every POST; `fail[path] = n` answers n 500s on that path first."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.fail: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.hits.append(Hit(self.path, self.headers, body, time.monotonic()))
                    failing = receiver.fail.get(self.path, 0)
                    if failing:
                        receiver.fail[self.path] = failing - 1
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def path(self) -> str:
        return f"/hook/{uuid.uuid4().hex[:12]}"

    def on(self, path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == path]

    def wait(self, path: str, n: int, timeout: float = 60.0) -> list[Hit]:
        deadline = time.monotonic() + timeout
        while len(self.on(path)) < n:
            assert time.monotonic() < deadline, f"{len(self.on(path))} of {n} deliveries to {path} after {timeout} s"
            time.sleep(0.05)
        return self.on(path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hooks(services, pg_worker):
    """(receiver, env, engine) for the module, with no delivery rows left from earlier runs."""
    settings, env = services
    engine = get_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.delete())
    receiver = Receiver()
    yield receiver, env, engine
    receiver.close()


@pytest.fixture
def start_api(hooks):
    """Starts API processes for one test (with extra env); stops the ones still running after it."""
    _, env, _ = hooks
    procs: list[ApiProcess] = []

    def start(**api_env: str) -> ApiProcess:
        procs.append(ApiProcess(env, **api_env))
        return procs[-1].wait_ready()

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.stop()
        elif not p.proc.stdout.closed:
            p.proc.stdout.close()


def deliveries(engine, tenant):
    return manager.list_deliveries(engine, tenant=tenant)


def signed_by(secret: str, hit: Hit) -> bool:
    return verify(secret, hit.body, hit.headers[TIMESTAMP_HEADER], hit.headers[SIGNATURE_HEADER])


def submit(http, key, url, text="What a wonderful day, I love it!"):
    resp = http.post("/v1/jobs", headers=key, json={"model": "minilm", "task": "sentiment",
                                                    "input": {"text": text}, "webhook_url": url})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_job_and_batch_webhooks_are_signed_with_the_tenants_secret(hooks, start_api):
    receiver, _, engine = hooks
    api = start_api(**FAST)
    key = new_key(engine, "hooks-signed")
    with httpx.Client(base_url=api.url, timeout=60) as http:
        secret = http.get("/v1/webhooks/secret", headers=key).json()["secret"]
        path = receiver.path()
        job = submit(http, key, receiver.url + path)
        hit, = receiver.wait(path, 1)
        final = http.get(f"/v1/jobs/{job['id']}", headers=key).json()
        assert final["status"] == "succeeded" and json.loads(hit.body) == final  # the job as the API shows it
        assert signed_by(secret, hit) and abs(int(hit.headers[TIMESTAMP_HEADER]) - time.time()) < 60
        assert hit.headers[EVENT_HEADER] == "job" and hit.headers["Content-Type"] == "application/json"
        assert hit.headers["Host"] == receiver.url.removeprefix("http://")
        row, = deliveries(engine, "hooks-signed")
        assert hit.headers[DELIVERY_HEADER] == row.id and row.target_id == job["id"]
        assert row.attempts == 1 and row.last_status == 204 and row.delivered_at is not None

        # a batch through the SDK over HTTP, after a rotation: one POST once all its jobs are final
        rotated = http.post("/v1/webhooks/secret:rotate", headers=key).json()["secret"]
        client = llmos.connect(api.url, api_key=key["Authorization"].split()[1])
        batch_path = receiver.path()
        handles = client.load_model("minilm").submit_many(
            [SentimentTask(text=t) for t in ("great", "awful", "fine")], webhook_url=receiver.url + batch_path)
        hit, = receiver.wait(batch_path, 1)
        client.close()
        summary = json.loads(hit.body)
        assert hit.headers[EVENT_HEADER] == "batch" and sorted(summary["job_ids"]) == sorted(h.id for h in handles)
        assert summary["total"] == 3 and summary["counts"]["succeeded"] == 3
        assert signed_by(rotated, hit) and not signed_by(secret, hit)
        time.sleep(1.0)
        assert len(receiver.on(batch_path)) == 1 and len(receiver.on(path)) == 1  # once each


def test_a_receiver_failing_twice_gets_the_delivery_on_the_third_try(hooks, start_api):
    receiver, _, engine = hooks
    api = start_api(**FAST)
    key = new_key(engine, "hooks-retry")
    path = receiver.path()
    receiver.fail[path] = 2
    with httpx.Client(base_url=api.url, timeout=60) as http:
        submit(http, key, receiver.url + path)
        hits = receiver.wait(path, 3)
        time.sleep(1.0)
        assert len(receiver.on(path)) == 3
        assert len({h.headers[DELIVERY_HEADER] for h in hits}) == 1  # the same delivery, retried
        assert hits[1].at - hits[0].at >= 0.4 and hits[2].at - hits[1].at >= 0.9  # 0.5 s, then 1 s
        secret = http.get("/v1/webhooks/secret", headers=key).json()["secret"]
        assert all(signed_by(secret, h) for h in hits)
        row, = deliveries(engine, "hooks-retry")
        assert row.attempts == 3 and row.last_status == 204 and row.delivered_at is not None
        assert row.given_up_at is None and row.last_error is None
        listed, = http.get("/v1/webhooks/deliveries", headers=key).json()["deliveries"]
        assert listed["attempts"] == 3 and listed["last_status"] == 204 and listed["next_attempt_at"] is None


def test_an_api_killed_before_delivering_loses_no_webhook(hooks, start_api):
    receiver, _, engine = hooks
    # This process polls once at start, then not for an hour: the job ends without a delivery.
    doomed = start_api(**{**FAST, "LLMOS_API_WEBHOOK_POLL_S": "3600"})
    time.sleep(0.5)  # its one poll is behind it
    key = new_key(engine, "hooks-crash")
    path = receiver.path()
    with httpx.Client(base_url=doomed.url, timeout=60) as http:
        job = submit(http, key, receiver.url + path)
    helpers.wait_all_final(engine, [job["id"]], timeout=60)
    row, = deliveries(engine, "hooks-crash")
    assert row.attempts == 0 and row.delivered_at is None and receiver.on(path) == []
    doomed.proc.kill()  # SIGKILL: no shutdown, nothing flushed
    doomed.proc.wait()
    doomed.proc.stdout.close()

    start_api(**FAST)  # a new process finds the row in the table and delivers it
    hit, = receiver.wait(path, 1)
    assert json.loads(hit.body)["id"] == job["id"] and hit.headers[DELIVERY_HEADER] == row.id
    time.sleep(1.5)
    assert len(receiver.on(path)) == 1  # exactly once
    row, = deliveries(engine, "hooks-crash")
    assert row.attempts == 1 and row.last_status == 204 and row.delivered_at is not None


def test_bad_webhook_urls_are_422_and_write_nothing(hooks, start_api):
    receiver, _, engine = hooks
    strict = start_api(LLMOS_API_WEBHOOK_DELIVER="false")  # the default policy: public addresses only
    key = new_key(engine, "hooks-bad")
    loopback = receiver.url + receiver.path()
    with httpx.Client(base_url=strict.url, timeout=60) as http:
        for url, words in (("ftp://example.com/hook", "http:// or https://"),
                           ("file:///etc/passwd", "http:// or https://"),
                           ("gopher://127.0.0.1:70/", "http:// or https://"),
                           ("example.com/hook", "http:// or https://"),
                           (loopback, "loopback"), ("http://localhost:9/h", "loopback"),
                           ("http://169.254.169.254/latest/meta-data", "link-local"),
                           ("https://example.com/" + "x" * 2100, "2048")):
            for path, body in (
                    ("/v1/jobs", {"model": "minilm", "task": "embed", "input": {"texts": ["x"]}, "webhook_url": url}),
                    ("/v1/jobs:batch", {"model": "minilm", "webhook_url": url,
                                        "jobs": [{"task": "embed", "input": {"texts": ["x"]}}]})):
                err = assert_error(http.post(path, json=body, headers=key), 422, "invalid_request")
                assert words in err["message"], err
        client = llmos.connect(strict.url, api_key=key["Authorization"].split()[1])
        with pytest.raises(ValidationError, match="loopback"):
            client.load_model("minilm").submit(SentimentTask(text="x"), webhook_url=loopback)
        client.close()
    assert manager.list_jobs(engine, tenant="hooks-bad") == [] and deliveries(engine, "hooks-bad") == []
    assert receiver.on(loopback.removeprefix(receiver.url)) == []


def test_each_key_sees_its_own_tenants_secret_and_deliveries(hooks, start_api):
    receiver, _, engine = hooks
    api = start_api(**FAST)
    a, b = new_key(engine, "hooks-a"), new_key(engine, "hooks-b")
    with httpx.Client(base_url=api.url, timeout=60) as http:
        sa_ = http.get("/v1/webhooks/secret", headers=a).json()["secret"]
        sb = http.get("/v1/webhooks/secret", headers=b).json()["secret"]
        assert sa_ != sb and http.get("/v1/webhooks/secret", headers=a).json()["secret"] == sa_
        path = receiver.path()
        job = submit(http, a, receiver.url + path)
        hit, = receiver.wait(path, 1)
        assert signed_by(sa_, hit) and not signed_by(sb, hit)
        assert [d["target_id"] for d in http.get("/v1/webhooks/deliveries", headers=a).json()["deliveries"]] \
            == [job["id"]]
        assert http.get("/v1/webhooks/deliveries", headers=b).json()["deliveries"] == []
        assert http.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}, headers=b).json() \
            == {"deliveries": []}
        assert_error(http.get("/v1/webhooks/secret"), 401, "unauthorized")
        http.post("/v1/webhooks/secret:rotate", headers=b)
        assert http.get("/v1/webhooks/secret", headers=a).json()["secret"] == sa_  # b's rotation is b's


def test_concurrent_claims_never_take_one_delivery_twice(hooks):
    """Two claimers at once on Postgres (FOR UPDATE SKIP LOCKED + lease): each row goes to one of them."""
    _, _, engine = hooks
    new = [manager.NewJob(model="gpt2", task_type="writing", input={"prompt": str(i)}, priority=5,
                          tenant="hooks-race") for i in range(40)]
    created = manager.create_jobs(engine, new, webhook_url="http://127.0.0.1:9/never")
    for job, _ in created:
        manager.cancel(engine, job.id, tenant="hooks-race")  # final: every delivery is due
    start = threading.Barrier(2)
    claimed: list[list[str]] = [[], []]

    def claimer(mine: list[str]) -> None:
        start.wait()
        while batch := manager.claim_deliveries(engine, limit=3, lease_s=600):
            mine.extend(d.id for d in batch if d.tenant == "hooks-race")

    threads = [threading.Thread(target=claimer, args=(c,)) for c in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = {d.id for d in deliveries(engine, "hooks-race")}
    assert len(ids) == 40 and sorted(claimed[0] + claimed[1]) == sorted(ids)  # all claimed, none twice
    assert claimed[0] and claimed[1]  # and both claimers took some
