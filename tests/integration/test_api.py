"""The REST API over real HTTP: uvicorn processes, a real minilm worker, Postgres and Redis."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from llmos import manager
from llmos.db import get_engine
from tests import helpers

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiProcess:
    """`python -m llmos.api.cli api` on a free port (the env carries the database, Redis and quotas)."""

    def __init__(self, env: dict[str, str], **api_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.api.cli", "api", "--port", str(self.port)],
                                     env={**env, **api_env}, cwd=helpers.REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 60.0) -> "ApiProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"API not ready after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.api.cli", *args], env=env, cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=60)


QUOTAS = dict(LLMOS_API_MAX_QUEUED_JOBS="2", LLMOS_API_RATE_LIMIT="8/minute")
"""Tight quotas of the two API processes of the quota test."""


@pytest.fixture(scope="module")
def api_servers(services, request):
    """One API process taking bodies up to 1 MiB and two with QUOTAS, started beside the worker."""
    _, env = services
    procs = [ApiProcess(env, LLMOS_API_MAX_BODY_BYTES=str(2**20)), ApiProcess(env, **QUOTAS),
             ApiProcess(env, **QUOTAS)]
    try:
        request.getfixturevalue("pg_worker")  # the worker loads its model meanwhile
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def api(api_servers, services):
    settings, env = services
    with httpx.Client(base_url=api_servers[0].url, timeout=90) as http:
        yield http, env, get_engine(settings.db_url)


def new_key(engine, tenant) -> dict[str, str]:
    _, key = manager.create_api_key(engine, tenant=tenant)
    return {"Authorization": f"Bearer {key}"}


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and isinstance(err["details"], dict)
    return err


def read_event(lines) -> tuple[str, dict]:
    """The next Server-Sent Event (name, data), skipping keep-alive comments."""
    name = data = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
        elif line == "" and name:
            return name, data
    raise AssertionError("the stream ended before an event")


def test_submit_wait_and_events(api):
    http, env, engine = api
    a = new_key(engine, "acme")
    resp = http.post("/v1/jobs", json={"model": "minilm", "task": "sentiment",
                                       "input": {"text": "Absolutely wonderful, I love it!"}}, headers=a)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    done = http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 60}, headers=a).json()
    assert done["status"] == "succeeded" and done["result"]["label"] == "POSITIVE", done
    assert done["compute_ms"] > 0 and done["attempts"] == 1
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=a) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert read_event(lines)[0] == "succeeded"
        assert list(lines) == []  # the stream ends after the final event


def test_events_follow_a_job_to_its_cancel(api):
    http, env, engine = api
    a = new_key(engine, "acme")
    # gpt2 has no worker here: the job stays queued until cancelled
    job = http.post("/v1/jobs", json={"model": "gpt2", "task": "writing", "input": {"prompt": "Once"}},
                    headers=a).json()
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=a) as r:
        lines = r.iter_lines()
        name, data = read_event(lines)
        assert name == "queued" and data == job
        cancelled = http.delete(f"/v1/jobs/{job['id']}", headers=a)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        name, data = read_event(lines)
        assert name == "cancelled" and data["id"] == job["id"] and data["finished_at"]
    err = assert_error(http.delete(f"/v1/jobs/{job['id']}", headers=a), 409, "job_final")
    assert err["details"] == {"status": "cancelled"}


def test_batch_runs_through_the_worker_and_pages(api):
    http, env, engine = api
    a = new_key(engine, "batcher")
    resp = http.post("/v1/jobs:batch", headers=a, json={
        "model": "minilm", "priority": "low",
        "jobs": [{"task": "embed", "input": {"texts": [f"document {i}"]}} for i in range(40)]})
    assert resp.status_code == 201, resp.text
    batch = resp.json()
    ids = [j["id"] for j in batch["jobs"]]
    helpers.wait_all_final(engine, ids, timeout=120)
    seen, cursor = [], None
    while True:
        params = {"batch_id": batch["batch_id"], "limit": 15, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/jobs", params=params, headers=a).json()
        seen += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(j["id"] for j in seen) == sorted(ids)
    assert {j["status"] for j in seen} == {"succeeded"} and {j["result"]["dim"] for j in seen} == {384}
    models = {m["name"]: m for m in http.get("/v1/models", headers=a).json()["data"]}
    assert models["minilm"]["served"] and models["minilm"]["workers"] >= 1 and not models["gpt2"]["served"]


def test_tenants_isolated_and_keys_refused(api):
    http, env, engine = api
    created = cli(env, "keys", "create", "--tenant", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    a, b = {"Authorization": f"Bearer {created.stdout.strip()}"}, new_key(engine, "globex")
    job = http.post("/v1/jobs", json={"model": "minilm", "task": "embed", "input": {"texts": ["x"]}},
                    headers=a).json()
    for method, path in (("GET", ""), ("GET", "/wait?timeout=0"), ("GET", "/events"), ("DELETE", "")):
        assert_error(http.request(method, f"/v1/jobs/{job['id']}{path}", headers=b), 404, "not_found")
    assert job["id"] not in {j["id"] for j in http.get("/v1/jobs", headers=b).json()["jobs"]}
    assert_error(http.get("/v1/jobs"), 401, "unauthorized")
    prefix = a["Authorization"].split("_")[1]
    listed = cli(env, "keys", "list", "--json")
    assert prefix in {k["prefix"] for k in json.loads(listed.stdout)}
    assert a["Authorization"].split()[1] not in listed.stdout  # the secret is never shown again
    assert cli(env, "keys", "revoke", prefix).returncode == 0
    assert_error(http.get(f"/v1/jobs/{job['id']}", headers=a), 401, "unauthorized")
    assert not manager.revoke_api_key(engine, prefix)  # already revoked


def test_bad_input_is_a_4xx_in_the_error_shape(api):
    http, env, engine = api
    a = new_key(engine, "acme")
    j = {**a, "Content-Type": "application/json"}
    assert_error(http.post("/v1/jobs", content=b'{"model": "minilm",', headers=j), 422, "invalid_request")
    assert_error(http.post("/v1/jobs", json={"model": 3, "task": "embed", "input": {}}, headers=a),
                 422, "invalid_request")
    assert_error(http.post("/v1/jobs", json={"model": "nope", "task": "embed", "input": {"texts": ["x"]}},
                           headers=a), 422, "unknown_model")
    assert_error(http.post("/v1/jobs", json={"model": "minilm", "task": "nope", "input": {}}, headers=a),
                 422, "invalid_request")
    assert_error(http.post("/v1/jobs", json={"model": "minilm", "task": "qa",
                                             "input": {"question": "q", "context": "c"}}, headers=a),
                 422, "unsupported_task")
    huge = {"model": "minilm", "task": "sentiment", "input": {"text": "x" * 2**21}}
    assert_error(http.post("/v1/jobs", json=huge, headers=a), 413, "body_too_large")
    assert http.get("/v1/jobs", params={"status": "queued", "model": "nope"}, headers=a).json()["jobs"] == []
    assert_error(http.get("/v1/jobs", params={"model": "\x00"}, headers=a), 422, "invalid_request")
    assert_error(http.get("/v1/jobs", params={"created_since": "yesterday"}, headers=a), 422, "invalid_request")


def test_quotas_answer_with_their_status(api, api_servers):
    _, _, engine = api
    one, two = api_servers[1:]
    with httpx.Client(base_url=one.url, timeout=30) as h1, httpx.Client(base_url=two.url, timeout=30) as h2:
        q = new_key(engine, "queue-quota")
        writing = {"model": "gpt2", "task": "writing", "input": {"prompt": "Once"}}  # no gpt2 worker
        assert h1.post("/v1/jobs", json=writing, headers=q).status_code == 201
        assert h2.post("/v1/jobs", json=writing, headers=q).status_code == 201
        resp = h1.post("/v1/jobs", json=writing, headers=q)
        err = assert_error(resp, 429, "quota_exceeded")
        assert err["details"]["limit"] == "max_queued_jobs" and int(resp.headers["Retry-After"]) > 0
        batch = {"model": "gpt2", "jobs": [{"task": "writing", "input": {"prompt": "x"}}]}
        assert_error(h2.post("/v1/jobs:batch", json=batch, headers=q), 429, "quota_exceeded")

        r = new_key(engine, "rate-quota")  # 8 a minute, counted in Redis across both processes
        for i in range(8):
            assert (h1 if i % 2 else h2).get("/v1/jobs", headers=r).status_code == 200
        resp = h1.get("/v1/jobs", headers=r)
        err = assert_error(resp, 429, "quota_exceeded")
        assert err["details"]["limit"] == "rate_limit" and 1 <= int(resp.headers["Retry-After"]) <= 60
        assert h2.get("/v1/jobs", headers=q).status_code == 200  # another tenant is not limited
    assert manager.queued_count(engine, tenant="queue-quota") == 2  # the refused submits wrote nothing
