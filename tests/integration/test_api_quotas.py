"""Per-tenant quotas from llmos.toml and load shedding by priority, over real HTTP.

uvicorn processes on free ports, Postgres and Redis; no worker runs, so every job stays queued
and the queues only grow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import redis

from llmos import manager
from llmos.db import get_engine
from llmos.dispatch import pending_set
from tests import helpers
from tests.integration.test_api import ApiProcess, assert_error, free_port, new_key

pytestmark = pytest.mark.integration

CONFIG = """
[tenants.big]            # more queued jobs than the global 2
max_queued_jobs = 4

[tenants.small]          # a tighter rate and a smaller body than the global ones
rate_limit = "3/minute"
max_body_bytes = 2000

[tenants.shed]
max_queued_jobs = 1000
rate_limit = "1000/minute"

[shedding.max_queue]
gpt2 = 2
"""

GLOBAL = dict(LLMOS_API_MAX_QUEUED_JOBS="2", LLMOS_API_RATE_LIMIT="30/minute",
              LLMOS_API_MAX_BODY_BYTES=str(2**20), LLMOS_API_QUEUE_RETRY_AFTER_S="3")


@pytest.fixture(scope="module")
def quota_api(services, tmp_path_factory):
    settings, env = services
    config = tmp_path_factory.mktemp("quota-cfg") / "llmos.toml"
    config.write_text(CONFIG)
    proc = ApiProcess(env, LLMOS_CONFIG=str(config), **GLOBAL)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            yield http, get_engine(settings.db_url), redis.Redis.from_url(settings.redis_url)
    finally:
        proc.stop()


def writing(model: str = "dialogpt", priority: str | int = "normal") -> dict:
    return {"model": model, "task": "writing", "input": {"prompt": "Once"}, "priority": priority}


def test_tenant_overrides_raise_and_lower_that_tenants_limits_only(quota_api):
    http, engine, _ = quota_api
    big, small, other = new_key(engine, "big"), new_key(engine, "small"), new_key(engine, "other")
    large = {**writing(), "input": {"prompt": "x" * 3000}}

    for _ in range(4):  # big: 4 (its own), not the global 2
        assert http.post("/v1/jobs", json=writing(), headers=big).status_code == 201
    err = assert_error(http.post("/v1/jobs", json=writing(), headers=big), 429, "quota_exceeded")
    assert err["details"]["limit"] == "max_queued_jobs" and "[tenants.big] max_queued_jobs" in err["message"]

    assert http.post("/v1/jobs", json=large, headers=other).status_code == 201  # 3000 bytes: under the cap
    assert http.post("/v1/jobs", json=writing(), headers=other).status_code == 201
    err = assert_error(http.post("/v1/jobs", json=writing(), headers=other), 429, "quota_exceeded")
    assert "quota of 2 (LLMOS_API_MAX_QUEUED_JOBS)" in err["message"]

    # small: bodies over its 2000 bytes refused after its key is read (declared or streamed)
    err = assert_error(http.post("/v1/jobs", json=large, headers=small), 413, "body_too_large")
    assert "this tenant's limit of 2000 bytes" in err["message"]
    body = json.dumps(large).encode()
    streamed = http.post("/v1/jobs", content=(p for p in [body[:1500], body[1500:]]),
                         headers={**small, "Content-Type": "application/json"})
    assert_error(streamed, 413, "body_too_large")
    assert http.get("/v1/jobs", headers=small).status_code == 200  # its third request this minute
    resp = http.get("/v1/jobs", headers=small)
    err = assert_error(resp, 429, "quota_exceeded")
    assert err["details"]["limit"] == "rate_limit" and "3/minute" in err["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    for _ in range(3):  # other is counted against the global 30 a minute
        assert http.get("/v1/jobs", headers=other).status_code == 200
    assert manager.queued_count(engine, tenant="big") == 4 and manager.queued_count(engine, tenant="small") == 0


def queue_length(r: redis.Redis, model: str) -> int:
    """Jobs waiting in Redis (the pending set: a bulk submit's message carries several)."""
    return int(r.scard(pending_set(model)))


def test_a_full_queue_sheds_batch_and_low_before_critical(quota_api):
    http, engine, r = quota_api
    shed = new_key(engine, "shed")
    assert queue_length(r, "gpt2") == 0
    for _ in range(2):  # gpt2's max_queue is 2 ([shedding.max_queue])
        assert http.post("/v1/jobs", json=writing("gpt2", "batch"), headers=shed).status_code == 201
    assert queue_length(r, "gpt2") == 2

    for priority in ("batch", "low"):
        resp = http.post("/v1/jobs", json=writing("gpt2", priority), headers=shed)
        err = assert_error(resp, 429, "quota_exceeded")
        assert err["details"]["limit"] == "model_queue_full" and resp.headers["Retry-After"] == "3"
        assert {k: err["details"][k] for k in ("model", "queue_length", "max_queue")} == {
            "model": "gpt2", "queue_length": 2, "max_queue": 2}
        assert f"model 'gpt2' is shedding priority {3 if priority == 'low' else 1}: 2 jobs wait" in err["message"]
        assert "[shedding.max_queue] gpt2 in llmos.toml" in err["message"]
    batch = {"model": "gpt2", "priority": "batch", "jobs": [{"task": "writing", "input": {"prompt": "x"}}]}
    assert_error(http.post("/v1/jobs:batch", json=batch, headers=shed), 429, "quota_exceeded")

    # at the same queue length, critical work passes; normal until 2x, high until 4x
    assert http.post("/v1/jobs", json=writing("gpt2", "critical"), headers=shed).status_code == 201
    assert http.post("/v1/jobs", json=writing("gpt2", "normal"), headers=shed).status_code == 201  # 4
    assert_error(http.post("/v1/jobs", json=writing("gpt2", "normal"), headers=shed), 429, "quota_exceeded")
    high = {**batch, "priority": "high", "jobs": batch["jobs"] * 4}
    assert http.post("/v1/jobs:batch", json=high, headers=shed).status_code == 201  # 8
    assert_error(http.post("/v1/jobs", json=writing("gpt2", "high"), headers=shed), 429, "quota_exceeded")
    for _ in range(2):
        assert http.post("/v1/jobs", json=writing("gpt2", 9), headers=shed).status_code == 201
    assert queue_length(r, "gpt2") == 10
    assert manager.queued_count(engine, tenant="shed") == 10  # the refused submits wrote nothing
    # another model's queue is its own (LLMOS_API_MAX_MODEL_QUEUE, 100000 here)
    assert http.post("/v1/jobs", json=writing("dialogpt", "batch"), headers=shed).status_code == 201


@pytest.mark.parametrize("config, expected", [
    ('[tenants.acme]\nrate_limt = "5/second"\n', "[tenants.acme] has unknown key 'rate_limt'"),
    ('[shedding.max_queue]\ngpt2 = -1\n', "[shedding.max_queue] gpt2 = -1 is invalid"),
])
def test_a_bad_file_stops_the_api_at_start(services, tmp_path, config, expected):
    _, env = services
    path = tmp_path / "llmos.toml"
    path.write_text(config)
    res = subprocess.run([sys.executable, "-m", "llmos.api.cli", "api", "--port", str(free_port())],
                         env={**env, "LLMOS_CONFIG": str(path)}, cwd=helpers.REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and str(path) in res.stderr and expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
