"""Per-tenant quota overrides from llmos.toml, and load shedding by priority (SQLite, no Redis)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from llmos import manager
from llmos.api import create_app
from llmos.api.quotas import SHED_FACTORS, shed_at
from llmos.api.settings import ApiSettings, TenantQuota, get_api_settings
from llmos.db import get_engine
from llmos.dispatch import InMemoryDispatcher, pending_set
from llmos.errors import ConfigError
from llmos.sdk import Client
from llmos.settings import Settings


def write(tmp_path, text: str):
    path = tmp_path / "llmos.toml"
    path.write_text(text)
    return path


def test_overrides_are_read_from_the_registry_file(tmp_path):
    path = write(tmp_path, """
[models.tiny]
source = "/nowhere"
tasks = ["embed"]

[tenants.acme]
rate_limit = "200/second"
max_queued_jobs = 100000
max_body_bytes = 8388608

[tenants.small]
max_queued_jobs = 3

[shedding.max_queue]
minilm = 50
""")
    api = get_api_settings(Settings(config=path))
    acme, small, other = api.quota("acme"), api.quota("small"), api.quota("other")
    assert (acme.rate_limit, acme.max_queued_jobs, acme.max_body_bytes) == ("200/second", 100000, 8388608)
    assert (small.rate_limit, small.max_queued_jobs, small.max_body_bytes) == ("100/second", 3, 32 * 2**20)
    assert (other.rate_limit, other.max_queued_jobs) == ("100/second", 100_000) and not other.overridden
    assert small.setting("max_queued_jobs") == "[tenants.small] max_queued_jobs in llmos.toml"
    assert small.setting("rate_limit") == "LLMOS_API_RATE_LIMIT"
    assert api.max_queue("minilm") == 50 and api.max_queue("gpt2") == 100_000
    assert api.max_queue_setting("gpt2") == "LLMOS_API_MAX_MODEL_QUEUE"


def test_the_file_in_the_working_directory_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[tenants.acme]\nmax_queued_jobs = 7\n')
    monkeypatch.setenv("LLMOS_API_MAX_QUEUED_JOBS", "9")
    api = get_api_settings()
    assert api.quota("acme").max_queued_jobs == 7 and api.quota("b").max_queued_jobs == 9


@pytest.mark.parametrize("text, expected", [
    ('[tenants.acme]\nrate_limt = "5/second"\n',
     "[tenants.acme] has unknown key 'rate_limt'; known keys: max_body_bytes, max_queued_jobs, rate_limit"),
    ('[tenants.acme]\nrate_limit = "lots"\n', "[tenants.acme] rate_limit = 'lots' is invalid: not a rate limit"),
    ('[tenants.acme]\nmax_queued_jobs = "10"\n', "[tenants.acme] max_queued_jobs = '10' is invalid"),
    ('[tenants.acme]\nmax_queued_jobs = 0\n', "[tenants.acme] max_queued_jobs = 0 is invalid"),
    ('[tenants.acme]\nmax_body_bytes = true\n', "[tenants.acme] max_body_bytes = True is invalid"),
    ('[tenants.acme]\nmax_body_bytes = 999999999999\n',
     "max_body_bytes = 999999999999 is above the global cap LLMOS_API_MAX_BODY_BYTES (33554432)"),
    ('[tenants]\nacme = 3\n', "[tenants.acme] must be a table"),
    ('tenants = 3\n', "tenants must be a table"),
    ('[shedding]\nmax_queues = 3\n', "[shedding] has unknown key 'max_queues'; known keys: max_queue"),
    ('[shedding.max_queue]\nminlm = 3\n', "[shedding.max_queue] names unknown model 'minlm'; known models:"),
    ('[shedding.max_queue]\nminilm = 0\n', "[shedding.max_queue] minilm = 0 is invalid"),
    ('[shedding.max_queue]\nminilm = 2.5\n', "[shedding.max_queue] minilm = 2.5 is invalid"),
    ('[tenants.acme\n', "cannot read"),
])
def test_a_bad_table_is_a_config_error_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        get_api_settings(Settings(config=path))
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_the_app_will_not_start_on_a_bad_file(tmp_path, monkeypatch, sqlite_settings):
    monkeypatch.setenv("LLMOS_CONFIG", str(write(tmp_path, '[tenants.acme]\nburst = 3\n')))
    with pytest.raises(ConfigError, match="burst"):
        create_app(client=Client(sqlite_settings, dispatcher=InMemoryDispatcher()))


def test_shedding_thresholds_by_priority():
    assert [shed_at(10, p) for p in range(10)] == [10, 10, 10, 10, 20, 20, 20, 40, 40, None]
    assert SHED_FACTORS[0] == (3, 1)  # batch (1) and low (3) go first


class FakeRedis:
    """Just enough of redis-py for the shedding check: SCARD of the pending set (jobs waiting)."""

    def __init__(self) -> None:
        self.lengths: dict[str, int] = {}

    def scard(self, key: str) -> int:
        return self.lengths.get(key, 0)

    def pipeline(self, transaction: bool = True) -> "FakeRedis":
        self._calls: list[str] = []
        return self

    def llen(self, key: str) -> None:
        self._calls.append(key)

    def execute(self) -> list[int]:
        return [self.lengths.get(k, 0) for k in self._calls]

    def close(self) -> None:
        pass


def make(sqlite_settings, redis_conn=None, **api):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher(), redis_conn=redis_conn)
    settings = ApiSettings(rate_limit_storage="memory://", **api)
    return TestClient(create_app(api_settings=settings, client=client)), get_engine(sqlite_settings.db_url)


def bearer(engine, tenant):
    return {"Authorization": f"Bearer {manager.create_api_key(engine, tenant=tenant)[1]}"}


SENTIMENT = {"model": "minilm", "task": "sentiment", "input": {"text": "lovely"}}


def test_a_tenant_override_changes_that_tenant_only(sqlite_settings):
    http, engine = make(sqlite_settings, max_queued_jobs=2, rate_limit="100/minute", max_body_bytes=4000,
                        tenants={"big": TenantQuota(max_queued_jobs=3),
                                 "small": TenantQuota(rate_limit="3/minute", max_body_bytes=1000)})
    big, small, other = bearer(engine, "big"), bearer(engine, "small"), bearer(engine, "other")
    large = {**SENTIMENT, "input": {"text": "x" * 1500}}
    with http:
        for _ in range(3):
            assert http.post("/v1/jobs", json=SENTIMENT, headers=big).status_code == 201
        resp = http.post("/v1/jobs", json=SENTIMENT, headers=big)
        assert resp.status_code == 429 and resp.json()["error"]["details"]["limit"] == "max_queued_jobs"
        assert "quota of 3 ([tenants.big] max_queued_jobs in llmos.toml)" in resp.json()["error"]["message"]
        four = {"model": "minilm", "jobs": [{"task": "embed", "input": {"texts": ["a"]}}] * 4}
        resp = http.post("/v1/jobs:batch", json=four, headers=big)  # could never fit: split it, not retry
        assert resp.status_code == 422 and "split the batch" in resp.json()["error"]["message"]
        assert http.post("/v1/jobs", json=large, headers=other).status_code == 201  # under the global 4000
        assert http.post("/v1/jobs", json=SENTIMENT, headers=other).status_code == 201
        resp = http.post("/v1/jobs", json=SENTIMENT, headers=other)
        assert resp.status_code == 429 and "(LLMOS_API_MAX_QUEUED_JOBS)" in resp.json()["error"]["message"]

        resp = http.post("/v1/jobs", json=large, headers=small)  # over small's own 1000 bytes
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
        assert "[tenants.small] max_body_bytes" in resp.json()["error"]["message"]
        body = json.dumps(large).encode()
        chunks = (part for part in [body[:800], body[800:]])  # no Content-Length: counted as it streams
        resp = http.post("/v1/jobs", content=chunks, headers={**small, "Content-Type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert http.get("/v1/jobs", headers=small).status_code == 200  # third request this minute
        resp = http.get("/v1/jobs", headers=small)
        assert resp.status_code == 429 and resp.json()["error"]["details"]["limit"] == "rate_limit"
        assert "3/minute" in resp.json()["error"]["message"]
        assert http.get("/v1/jobs", headers=other).status_code == 200
    assert manager.queued_count(engine, tenant="small") == 0


def test_shedding_refuses_low_priority_first(sqlite_settings):
    fake = FakeRedis()
    http, engine = make(sqlite_settings, redis_conn=fake, max_model_queue=10, queue_retry_after_s=7)
    a = bearer(engine, "acme")
    pending = pending_set("minilm")
    with http:
        fake.lengths = {pending: 10}  # 10 jobs waiting (in any number of messages)
        for priority in ("batch", "low", 0):
            resp = http.post("/v1/jobs", json={**SENTIMENT, "priority": priority}, headers=a)
            assert resp.status_code == 429 and resp.headers["Retry-After"] == "7", resp.text
            err = resp.json()["error"]
            assert err["code"] == "quota_exceeded" and err["details"]["limit"] == "model_queue_full"
            assert "model 'minilm' is shedding priority" in err["message"]
            assert "10 jobs wait in its queue, at or past 10 (1x its max_queue of 10" in err["message"]
            assert "LLMOS_API_MAX_MODEL_QUEUE" in err["message"]
        for priority in ("normal", "high", "critical"):
            assert http.post("/v1/jobs", json={**SENTIMENT, "priority": priority}, headers=a).status_code == 201
        batch = {"model": "minilm", "priority": "normal", "jobs": [{"task": "embed", "input": {"texts": ["a"]}}] * 11}
        assert http.post("/v1/jobs:batch", json=batch, headers=a).status_code == 201  # below 20: taken whole
        fake.lengths = {pending: 20}
        assert http.post("/v1/jobs:batch", json=batch, headers=a).status_code == 429  # at 2 × 10: normal is shed
        fake.lengths = {pending: 100}
        assert http.post("/v1/jobs", json={**SENTIMENT, "priority": "high"}, headers=a).status_code == 429
        assert http.post("/v1/jobs", json={**SENTIMENT, "priority": 9}, headers=a).status_code == 201
        assert http.post("/v1/jobs", json={**SENTIMENT, "model": "gpt2", "task": "writing",
                                           "input": {"prompt": "x"}, "priority": "batch"}, headers=a).status_code == 201
    assert manager.queued_count(engine, tenant="acme") == 16  # 5 single jobs and a batch of 11; the refused wrote nothing


def test_shedding_passes_when_redis_does_not_answer(sqlite_settings):
    http, engine = make(sqlite_settings, max_model_queue=1)  # sqlite_settings' Redis is port 1
    with http:
        resp = http.post("/v1/jobs", json={**SENTIMENT, "priority": "batch"}, headers=bearer(engine, "a"))
        assert resp.status_code == 201
