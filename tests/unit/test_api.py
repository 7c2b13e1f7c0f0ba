"""The API on SQLite with an in-memory dispatcher: auth, the error shape, validation, quotas, paging."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings
from llmos.db import get_engine
from llmos.dispatch import InMemoryDispatcher
from llmos.sdk import Client


def make(sqlite_settings, **limits):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher())
    api = ApiSettings(rate_limit_storage="memory://", **limits)
    return TestClient(create_app(api_settings=api, client=client)), get_engine(sqlite_settings.db_url)


@pytest.fixture
def api(sqlite_settings):
    http, engine = make(sqlite_settings)
    _, key_a = manager.create_api_key(engine, tenant="acme")
    _, key_b = manager.create_api_key(engine, tenant="globex")
    with http:
        yield http, engine, {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details", "type", "param"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


SENTIMENT = {"model": "minilm", "task": "sentiment", "input": {"text": "lovely"}}


def test_submit_read_and_tenant_isolation(api):
    http, engine, a, b = api
    resp = http.post("/v1/jobs", json={**SENTIMENT, "priority": "high", "idempotency_key": "k1"}, headers=a)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["priority"] == 7 and job["task"] == "sentiment"
    again = http.post("/v1/jobs", json={**SENTIMENT, "priority": "high", "idempotency_key": "k1"}, headers=a)
    assert again.json()["id"] == job["id"]
    assert http.get(f"/v1/jobs/{job['id']}", headers=a).json()["id"] == job["id"]
    assert manager.get_job(engine, job["id"], tenant="acme").tenant == "acme"
    assert_error(http.get(f"/v1/jobs/{job['id']}", headers=b), 404, "not_found")
    assert_error(http.delete(f"/v1/jobs/{job['id']}", headers=b), 404, "not_found")
    assert http.get("/v1/jobs", headers=b).json()["jobs"] == []
    assert_error(http.get("/v1/jobs/not-a-uuid", headers=a), 404, "not_found")


def test_keys_refused(api, sqlite_settings):
    http, engine, a, _ = api
    assert_error(http.get("/v1/jobs"), 401, "unauthorized")
    assert_error(http.get("/v1/jobs", headers={"Authorization": "Bearer llmos_abc_wrong"}), 401, "unauthorized")
    assert_error(http.get("/v1/jobs", headers={"Authorization": "Basic eDp5"}), 401, "unauthorized")
    prefix = a["Authorization"].split("_")[1]
    assert http.get("/v1/jobs", headers=a).status_code == 200
    assert manager.revoke_api_key(engine, prefix)
    assert_error(http.get("/v1/jobs", headers=a), 401, "unauthorized")
    assert http.get("/healthz").json() == {"status": "ok"}  # no key needed


def test_key_is_hashed_and_checked_whole(sqlite_settings):
    engine = get_engine(sqlite_settings.db_url)
    key, secret = manager.create_api_key(engine, tenant="t", name="ci", admin=True)
    assert secret.startswith(f"llmos_{key.prefix}_")
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("select hash from api_keys").scalar_one()
    assert secret.split("_", 2)[2] not in stored and len(stored) == 64
    found = manager.authenticate_key(engine, secret)
    assert found is not None and found.tenant == "t" and found.admin
    assert manager.list_api_keys(engine)[0].last_used_at is not None
    assert manager.authenticate_key(engine, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert not manager.revoke_api_key(engine, "nope")
    assert manager.authenticate_key(engine, f"llmos_{key.prefix}\x00_x") is None
    assert not manager.revoke_api_key(engine, "ab\x00")


@pytest.mark.parametrize("body, code", [
    ({"model": "minilm", "task": "sentiment"}, "invalid_request"),  # input missing
    ({**SENTIMENT, "priority": True}, "invalid_request"),  # a boolean is not a priority
    ({**SENTIMENT, "priority": 12}, "invalid_request"),  # the SDK's range check
    ({**SENTIMENT, "timeout_s": "5"}, "invalid_request"),
    ({**SENTIMENT, "input": {"text": ""}}, "invalid_request"),
    ({**SENTIMENT, "input": "lovely"}, "invalid_request"),
    ({**SENTIMENT, "surprise": 1}, "invalid_request"),
    ({**SENTIMENT, "model": "nope"}, "unknown_model"),
    ({**SENTIMENT, "task": "nope"}, "invalid_request"),
    ({**SENTIMENT, "task": "writing", "input": {"prompt": "hi"}}, "unsupported_task"),
    ({**SENTIMENT, "deadline": "2030-01-01T00:00:00"}, "invalid_request"),  # naive
])
def test_bad_submits_are_422_and_write_nothing(api, body, code):
    http, engine, a, _ = api
    assert_error(http.post("/v1/jobs", json=body, headers=a), 422, code)
    assert manager.list_jobs(engine, tenant=manager.ANY_TENANT) == []


def test_malformed_json_and_wrong_routes(api):
    http, _, a, _ = api
    err = assert_error(http.post("/v1/jobs", content=b"{not json", headers={**a, "Content-Type": "application/json"}),
                       422, "invalid_request")
    assert err["details"]["errors"][0]["type"] == "json_invalid"
    assert_error(http.get("/v1/nothing", headers=a), 404, "not_found")
    assert_error(http.put("/v1/jobs", headers=a), 405, "method_not_allowed")
    assert_error(http.get("/v1/jobs?limit=0", headers=a), 422, "invalid_request")
    assert_error(http.get("/v1/jobs?cursor=garbage", headers=a), 422, "invalid_request")
    assert_error(http.get("/v1/jobs?model=%00", headers=a), 422, "invalid_request")
    assert_error(http.get("/v1/jobs?status=done", headers=a), 422, "invalid_request")
    assert_error(http.get("/v1/jobs/00000000-0000-0000-0000-000000000000/wait?timeout=61", headers=a),
                 422, "invalid_request")


def test_batch_and_cursor_pages_newest_first(api):
    http, _, a, _ = api
    resp = http.post("/v1/jobs:batch", headers=a, json={
        "model": "minilm", "priority": 3,
        "jobs": [{"task": "embed", "input": {"texts": [f"doc {i}"]}} for i in range(25)]})
    assert resp.status_code == 201, resp.text
    batch = resp.json()
    assert len(batch["jobs"]) == 25 and {j["batch_id"] for j in batch["jobs"]} == {batch["batch_id"]}
    http.post("/v1/jobs", json=SENTIMENT, headers=a)
    seen, cursor = [], None
    while True:
        page = http.get("/v1/jobs", headers=a, params={"limit": 10, "batch_id": batch["batch_id"],
                                                       **({"cursor": cursor} if cursor else {})}).json()
        seen += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(j["id"] for j in seen) == sorted(j["id"] for j in batch["jobs"])  # each once
    keys = [(j["created_at"], j["id"]) for j in seen]
    assert keys == sorted(keys, reverse=True)
    assert len(http.get("/v1/jobs?task=sentiment&status=queued", headers=a).json()["jobs"]) == 1
    assert http.get("/v1/jobs?created_since=2999-01-01T00:00:00Z", headers=a).json()["jobs"] == []


def test_batch_all_or_nothing(api):
    http, engine, a, _ = api
    err = assert_error(http.post("/v1/jobs:batch", headers=a, json={
        "model": "minilm", "jobs": [{"task": "sentiment", "input": {"text": "ok"}},
                                    {"task": "sentiment", "input": {"text": " "}}]}), 422, "invalid_request")
    assert "text" in err["message"]
    assert manager.list_jobs(engine, tenant=manager.ANY_TENANT) == []
    assert_error(http.post("/v1/jobs:batch", headers=a, json={"model": "minilm", "jobs": []}), 422, "invalid_request")


def test_cancel_then_409(api):
    http, _, a, _ = api
    job = http.post("/v1/jobs", json=SENTIMENT, headers=a).json()
    assert http.delete(f"/v1/jobs/{job['id']}", headers=a).json()["status"] == "cancelled"
    err = assert_error(http.delete(f"/v1/jobs/{job['id']}", headers=a), 409, "job_final")
    assert err["details"] == {"status": "cancelled"}


def test_quotas(sqlite_settings):
    http, engine = make(sqlite_settings, max_queued_jobs=2, rate_limit="6/minute", max_body_bytes=2000)
    _, key = manager.create_api_key(engine, tenant="small")
    a = {"Authorization": f"Bearer {key}"}
    with http:
        assert http.post("/v1/jobs", json=SENTIMENT, headers=a).status_code == 201
        assert http.post("/v1/jobs", json=SENTIMENT, headers=a).status_code == 201
        resp = http.post("/v1/jobs", json=SENTIMENT, headers=a)
        err = assert_error(resp, 429, "quota_exceeded")
        assert err["details"]["limit"] == "max_queued_jobs" and resp.headers["Retry-After"] == "5"
        big = {**SENTIMENT, "input": {"text": "x" * 3000}}
        err = assert_error(http.post("/v1/jobs", json=big, headers=a), 413, "body_too_large")
        chunks = (part for part in [json.dumps(big).encode()[:1500], json.dumps(big).encode()[1500:]])
        assert_error(http.post("/v1/jobs", content=chunks, headers={**a, "Content-Type": "application/json"}),
                     413, "body_too_large")  # streamed without Content-Length
        for _ in range(3):  # 3 submits + 3 reads: 6 counted (a 413 never reaches the key check)
            assert http.get("/v1/jobs", headers=a).status_code == 200
        resp = http.get("/v1/jobs", headers=a)
        err = assert_error(resp, 429, "quota_exceeded")
        assert err["details"]["limit"] == "rate_limit" and 1 <= int(resp.headers["Retry-After"]) <= 60


def test_admin_keys_routes(api, sqlite_settings):
    http, engine, a, _ = api
    assert_error(http.get("/v1/keys", headers=a), 403, "forbidden")
    _, admin = manager.create_api_key(engine, tenant="ops", admin=True)
    h = {"Authorization": f"Bearer {admin}"}
    created = http.post("/v1/keys", json={"tenant": "new", "name": "svc"}, headers=h)
    assert created.status_code == 201, created.text
    new = created.json()
    assert new["key"].startswith("llmos_") and new["tenant"] == "new"
    listed = http.get("/v1/keys", headers=h).json()["keys"]
    assert new["prefix"] in {k["prefix"] for k in listed} and all("key" not in k for k in listed)
    assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {new['key']}"}).status_code == 200
    assert http.delete(f"/v1/keys/{new['prefix']}", headers=h).status_code == 204
    assert_error(http.delete(f"/v1/keys/{new['prefix']}", headers=h), 404, "not_found")
    assert_error(http.get("/v1/jobs", headers={"Authorization": f"Bearer {new['key']}"}), 401, "unauthorized")


def test_models_and_openapi(api):
    http, _, a, _ = api
    listed = http.get("/v1/models", headers=a).json()
    assert listed["object"] == "list"  # OpenAI's shape, LLMOS's fields inside each item
    models = {m["name"]: m for m in listed["data"]}
    assert models["minilm"]["tasks"] == ["embed", "sentiment", "summarize"] and models["minilm"]["served"] is False
    assert {m["id"] for m in listed["data"]} == set(models) and {m["object"] for m in listed["data"]} == {"model"}
    assert models["gpt2"]["owned_by"] == "llmos" and "chat" in models["gpt2"]["tasks"]
    assert http.get("/v1/models/minilm", headers=a).json() == models["minilm"]
    assert_error(http.get("/v1/models/nope", headers=a), 404, "model_not_found")
    spec = http.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"] or "201" in op["responses"] or "204" in op["responses"], (path, method)
            if path.startswith("/v1/"):
                assert {"401", "422", "429"} <= set(op["responses"]), (path, method)


def test_a_keyed_batch_retried_without_a_batch_id_answers_the_first_batch_id(api):
    http, _, a, _ = api
    body = {"model": "minilm", "jobs": [{"task": "embed", "input": {"texts": [f"doc {i}"]}, "idempotency_key": f"k{i}"}
                                        for i in range(3)]}
    first = http.post("/v1/jobs:batch", headers=a, json=body).json()
    again = http.post("/v1/jobs:batch", headers=a, json=body).json()
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in first["jobs"]]
    assert again["batch_id"] == first["batch_id"] == first["jobs"][0]["batch_id"]


def test_the_app_end_stops_the_openai_waiters_and_closes_the_stream_redis(sqlite_settings, redis_url):
    """The lifespan's end shuts the waiter pool and closes the streams' asyncio Redis client (its
    connection leaves the server: CLIENT LIST by the connection's id)."""
    import types

    import redis

    from llmos.api.routes import openai as routes

    http, _ = make(sqlite_settings)
    app = http.app
    client = app.state.client.__class__(sqlite_settings.model_copy(update={"redis_url": redis_url}),
                                        dispatcher=InMemoryDispatcher())
    with http:
        pool = routes._waiters(app, app.state.api_settings)
        assert pool.submit(lambda: 7).result() == 7

        async def connect():
            return await routes._stream_client(types.SimpleNamespace(app=app), client).client_id()

        conn_id = http.portal.call(connect)
        server = redis.Redis.from_url(redis_url)
        assert server.client_list(client_id=[conn_id])  # connected now
    assert pool._shutdown and app.state.openai_waiters is None and app.state.openai_redis is None
    assert server.client_list(client_id=[conn_id]) == []
    client.close()


def test_a_stream_whose_wait_fails_ends_with_an_error_event(sqlite_settings, redis_url, tmp_path):
    """The database stops answering while a streamed request waits (its jobs table renamed away
    once the job is written: the submit reads only the workers table after): the stream ends with an error event (503 database_unavailable),
    never a traceback; the table comes back afterwards."""
    import socket
    import sqlite3
    import threading
    import time

    import redis

    from llmos.notify import publish_done

    settings = sqlite_settings.model_copy(update={"redis_url": redis_url})
    client = Client(settings, dispatcher=InMemoryDispatcher())
    http = TestClient(create_app(api_settings=ApiSettings(rate_limit_storage="memory://"), client=client))
    engine = get_engine(settings.db_url)
    _, secret = manager.create_api_key(engine, tenant="acme")
    manager.register_worker(engine, worker_id=f"gpt2@{socket.gethostname()}:0:t", host="t", pid=0, model="gpt2",
                            device="cpu")
    db_file = settings.db_url.removeprefix("sqlite:///")
    broken = threading.Event()

    def break_the_database() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = manager.list_jobs(engine, tenant="acme", limit=1)
            if jobs:
                with sqlite3.connect(db_file) as conn:
                    conn.execute("ALTER TABLE jobs RENAME TO jobs_away")
                broken.set()
                publish_done(redis.Redis.from_url(redis_url), [jobs[0].id])  # the waiter reads it now
                return
            time.sleep(0.05)

    with http:
        breaker = threading.Thread(target=break_the_database)
        breaker.start()
        try:
            resp = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "gpt2", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
        finally:
            breaker.join()
            if broken.is_set():
                with sqlite3.connect(db_file) as conn:
                    conn.execute("ALTER TABLE jobs_away RENAME TO jobs")
    assert broken.is_set() and resp.status_code == 200
    events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-1])
    assert last["error"]["code"] == "database_unavailable" and last["error"]["type"], last
    assert "[DONE]" not in events
