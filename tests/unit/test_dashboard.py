"""The dashboard on SQLite with an in-memory dispatcher: login and its cookie, CSRF, tenants, actions."""

from __future__ import annotations

import logging
import re
import stat
import threading
from datetime import timedelta

import pydantic
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings, get_api_settings
from llmos.db import api_keys, get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import BrokerUnavailableError, ConfigError
from llmos.monitoring.dashboard import STATIC, panels, session
from llmos.sdk import Client

SENTIMENT = {"model": "minilm", "task": "sentiment", "input": {"text": "lovely"}}
SECRET = "unit-test-dashboard-secret-" + "0" * 16


def make_dash(sqlite_settings, **api):
    dispatcher = InMemoryDispatcher()
    client = Client(sqlite_settings, dispatcher=dispatcher)
    app = create_app(api_settings=ApiSettings(rate_limit_storage="memory://", **api), client=client)
    engine = get_engine(sqlite_settings.db_url)
    keys = {name: manager.create_api_key(engine, tenant=tenant, admin=admin)[1]
            for name, tenant, admin in (("a", "acme", False), ("b", "globex", False), ("root", "ops", True))}
    return TestClient(app, base_url="http://testserver"), engine, keys, dispatcher


@pytest.fixture
def dash(sqlite_settings):
    http, *rest = make_dash(sqlite_settings, dashboard_secret=SECRET)
    with http:
        yield http, *rest


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def login(http, key):
    """Log in through the form; returns the CSRF token the page carries."""
    resp = http.post("/dashboard/login", data={"key": key}, follow_redirects=False)
    assert resp.status_code == 303, resp.text
    page = http.get("/dashboard")
    assert page.status_code == 200 and 'id="panel-counts"' in page.text
    return re.search(r'name="llmos-csrf" content="([0-9a-f]+)"', page.text).group(1)


def submit(http, key, n=1):
    ids = []
    for _ in range(n):
        resp = http.post("/v1/jobs", json=SENTIMENT, headers=bearer(key))
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    return ids


def fail(engine, job_id, error="runner exploded"):
    claimed, _ = manager.claim(engine, [job_id], worker_id="w1", device="cpu")
    assert claimed
    assert manager.finish(engine, [manager.Outcome(job_id=job_id, worker_id="w1", attempt=claimed[0].attempts,
                                                   error=error, compute_ms=5.0, queue_wait_ms=2.0)]) == 1


def test_login_sets_a_signed_http_only_strict_cookie(dash):
    http, engine, keys, _ = dash
    form = http.get("/dashboard")
    assert form.status_code == 200 and 'action="/dashboard/login"' in form.text
    assert "script-src 'self'" in form.headers["content-security-policy"]
    resp = http.post("/dashboard/login", data={"key": keys["a"]}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/dashboard"
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{session.COOKIE}=")
    for flag in ("HttpOnly", "SameSite=strict", "Path=/dashboard", "Max-Age=28800"):
        assert flag.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http here
    value = cookie.split(";")[0].split("=", 1)[1]
    assert keys["a"].split("_", 2)[2] not in value and keys["a"] not in value  # the key is not in the cookie
    assert http.get("/dashboard/api/overview").json()["me"]["tenant"] == "acme"
    # https (behind a proxy that says so): Secure
    https = http.post("/dashboard/login", data={"key": keys["a"]}, headers={"X-Forwarded-Proto": "https"},
                      follow_redirects=False)
    assert "secure" in https.headers["set-cookie"].lower()


def test_bad_key_answers_the_form_with_the_error(dash):
    http, *_ = dash
    resp = http.post("/dashboard/login", data={"key": "llmos_abc_wrong"}, follow_redirects=False)
    assert resp.status_code == 401 and 'id="login-error"' in resp.text and "set-cookie" not in resp.headers
    assert http.post("/dashboard/login", data={}, follow_redirects=False).status_code == 401


def test_api_without_session_is_401_and_forged_or_revoked_sessions_fail(dash):
    http, engine, keys, _ = dash
    resp = http.get("/dashboard/api/overview")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    login(http, keys["a"])
    value = http.cookies.get(session.COOKIE)
    key_id, expires, mac = value.split(".")
    http.cookies.clear()
    http.cookies.set(session.COOKIE, f"{key_id}.{int(expires) + 9999}.{mac}")
    assert http.get("/dashboard/api/overview").status_code == 401  # a longer expiry is a forgery
    http.cookies.clear()
    http.cookies.set(session.COOKIE, value)
    assert http.get("/dashboard/api/overview").status_code == 200
    assert manager.revoke_api_key(engine, keys["a"].split("_")[1])
    assert http.get("/dashboard/api/overview").status_code == 401  # revoking the key ends its sessions
    assert 'action="/dashboard/login"' in http.get("/dashboard").text
    # expiry
    key = manager.authenticate_key(engine, keys["b"])
    old = session.make(engine, key, secret=SECRET, max_age_s=10, now=0)
    assert session.verify(engine, old, secret=SECRET) is None
    assert session.verify(engine, session.make(engine, key, secret=SECRET, max_age_s=10), secret=SECRET) is not None
    assert session.verify(engine, session.make(engine, key, secret="x" * 32, max_age_s=10), secret="y" * 32) is None


def test_actions_need_the_csrf_header(dash):
    http, engine, keys, _ = dash
    (job,) = submit(http, keys["a"])
    csrf = login(http, keys["a"])
    resp = http.post(f"/dashboard/api/jobs/{job}/cancel")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    assert http.post(f"/dashboard/api/jobs/{job}/cancel", headers={session.CSRF_HEADER: "0" * 64}).status_code == 403
    cross = http.post(f"/dashboard/api/jobs/{job}/cancel",
                      headers={session.CSRF_HEADER: csrf, "Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert manager.get_job(engine, job, tenant="acme").status.value == "queued"
    ok = http.post(f"/dashboard/api/jobs/{job}/cancel", headers={session.CSRF_HEADER: csrf, "Origin": "http://testserver"})
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
    assert manager.get_job(engine, job, tenant="acme").status.value == "cancelled"
    # a Bearer call carries no ambient credential: no token needed
    (other,) = submit(http, keys["a"])
    http.cookies.clear()
    assert http.post(f"/dashboard/api/jobs/{other}/cancel", headers=bearer(keys["a"])).status_code == 200


def test_wrong_state_is_409_unknown_is_404(dash):
    http, engine, keys, dispatcher = dash
    queued, failed = submit(http, keys["a"], 2)
    fail(engine, failed)
    csrf = {session.CSRF_HEADER: login(http, keys["a"])}
    resp = http.post(f"/dashboard/api/jobs/{queued}/retry", headers=csrf)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_state"
    assert resp.json()["error"]["details"] == {"status": "queued"}
    assert http.post(f"/dashboard/api/jobs/{failed}/cancel", headers=csrf).status_code == 409
    for path in ("/dashboard/api/jobs/00000000-0000-0000-0000-000000000000/cancel",
                 "/dashboard/api/jobs/not-a-uuid/retry", "/dashboard/api/batches/batch_nope/cancel"):
        r = http.post(path, headers=csrf)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    assert http.get("/dashboard/api/jobs/not-a-uuid").status_code == 404
    # retry: failed → queued, sent again, error cleared, attempts kept and the budget raised
    sent = len(dispatcher.sent)
    again = http.post(f"/dashboard/api/jobs/{failed}/retry", headers=csrf)
    assert again.status_code == 200, again.text
    row = manager.get_job(engine, failed, tenant="acme")
    assert row.status.value == "queued" and row.error is None and row.result is None and row.finished_at is None
    assert row.attempts == 1 and row.max_attempts == 4
    assert [job_id for _, job_id, _ in dispatcher.sent[sent:]] == [failed]
    assert http.post(f"/dashboard/api/jobs/{failed}/retry", headers=csrf).status_code == 409  # now queued
    # and the /v1 route
    fail(engine, failed)
    assert http.post(f"/v1/jobs/{failed}/retry", headers=bearer(keys["a"])).json()["status"] == "queued"
    r = http.post(f"/v1/jobs/{failed}/retry", headers=bearer(keys["a"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_state"


def test_tenant_isolation(dash):
    http, engine, keys, _ = dash
    (mine,) = submit(http, keys["a"])
    (theirs,) = submit(http, keys["b"])
    fail(engine, theirs, "globex's secret error")
    csrf = {session.CSRF_HEADER: login(http, keys["a"])}
    view = http.get("/dashboard/api/overview").json()
    assert view["counts"]["open"]["queued"] == 1 and view["counts"]["hour"]["failed"] == 0
    assert [j["id"] for j in view["queued_jobs"]] == [mine] and view["failures"] == []
    assert view["workers"] is None and "capacity" not in view and "redis" not in view
    assert http.get("/dashboard/api/overview?tenant=globex").json()["failures"] == []  # a filter is no escape
    assert http.get(f"/dashboard/api/jobs/{theirs}").status_code == 404
    assert http.post(f"/dashboard/api/jobs/{theirs}/retry", headers=csrf).status_code == 404
    (their_queued,) = submit(http, keys["b"])
    assert http.post(f"/dashboard/api/jobs/{their_queued}/cancel", headers=csrf).status_code == 404
    assert manager.get_job(engine, their_queued, tenant="globex").status.value == "queued"
    # an admin sees every tenant, or one with the filter, and acts on any
    http.cookies.clear()
    root = bearer(keys["root"])
    every = http.get("/dashboard/api/overview", headers=root).json()
    assert every["counts"]["open"]["queued"] == 2 and len(every["failures"]) == 1
    assert set(every["tenants"]) == {"acme", "globex", "ops"} and every["workers"] == []
    one = http.get("/dashboard/api/overview?tenant=acme", headers=root).json()
    assert one["counts"]["open"]["queued"] == 1 and one["failures"] == []
    assert http.post(f"/dashboard/api/jobs/{their_queued}/cancel", headers=root).status_code == 200
    assert http.get(f"/dashboard/api/jobs/{theirs}", headers=root).json()["error"] == "globex's secret error"


def test_panels_count_what_the_table_holds(dash):
    http, engine, keys, _ = dash
    ids = submit(http, keys["a"], 5)
    fail(engine, ids[0])
    claimed, _ = manager.claim(engine, ids[1:3], worker_id="w1", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=j.id, worker_id="w1", attempt=1, result={"label": "positive"},
                                            compute_ms=10.0 * (i + 1), queue_wait_ms=100.0 * (i + 1), batch_size=2)
                            for i, j in enumerate(claimed)])
    manager.cancel(engine, ids[3], tenant="acme")
    view = http.get("/dashboard/api/overview", headers=bearer(keys["a"])).json()
    assert view["counts"]["open"] == {"queued": 1, "running": 0}
    assert view["counts"]["hour"] == {"succeeded": 2, "failed": 1, "cancelled": 1, "expired": 0}
    assert view["counts"]["day"] == view["counts"]["hour"]
    assert view["throughput"]["total"] == 4 and len(view["throughput"]["minutes"]) == 60
    assert sum(m["succeeded"] for m in view["throughput"]["minutes"]) == 2
    (lat,) = view["latency"]["models"]
    assert lat["model"] == "minilm" and lat["compute_p50_ms"] == pytest.approx((5 + 10 + 20) / 3, abs=5)
    assert view["queue_depth"] == [{"model": "minilm", "priority": 5, "queued": 1, "oldest_s": pytest.approx(0, abs=60)}]
    t = http.get(f"/dashboard/api/jobs/{ids[1]}", headers=bearer(keys["a"])).json()
    assert t["status"] == "succeeded" and t["started_at"] and t["finished_at"] and not t["cancellable"]
    with engine.connect() as conn:
        assert conn.execute(jobs.select().where(jobs.c.status == "queued")).all()[0].id == ids[4]


def test_page_assets_are_shipped_and_local():
    names = {p.name for p in STATIC.iterdir()}
    assert {"dashboard.html", "login.html", "dashboard.js", "dashboard.css"} <= names
    for name in names:
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "@import" not in text, name
        assert not re.search(r"fetch\(\s*['\"`]https?:", text), name


def test_percentile():
    assert panels._percentile([], 50) is None
    assert panels._percentile([1, 2, 3, 4], 50) == 2.5
    assert panels._percentile(list(range(101)), 95) == 95


def make_batch(http, key, n=3):
    lines = "".join(f'{{"id": "r{i}", "text": "line {i}"}}\n' for i in range(n)).encode()
    up = http.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}, headers=bearer(key))
    assert up.status_code == 200, up.text
    made = http.post("/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/jobs", "task": "sentiment",
                                          "model": "minilm", "completion_window": "24h"}, headers=bearer(key))
    assert made.status_code == 200, made.text
    return made.json()["id"]


def test_batches_panel_and_cancel(dash):
    http, engine, keys, _ = dash
    batch = make_batch(http, keys["a"])
    view = http.get("/dashboard/api/overview", headers=bearer(keys["a"])).json()
    (row,) = view["batches"]
    assert row["id"] == batch and row["status"] == "in_progress" and row["total"] == 3 and row["queued"] == 3
    assert row["done"] == 0
    assert http.get("/dashboard/api/overview", headers=bearer(keys["b"])).json()["batches"] == []
    assert http.post(f"/dashboard/api/batches/{batch}/cancel", headers=bearer(keys["b"])).status_code == 404
    csrf = {session.CSRF_HEADER: login(http, keys["a"])}
    assert http.post(f"/dashboard/api/batches/{batch}/cancel").status_code == 403  # no CSRF header
    resp = http.post(f"/dashboard/api/batches/{batch}/cancel", headers=csrf)
    assert resp.status_code == 200 and resp.json()["status"] in ("cancelling", "cancelled"), resp.text
    assert manager.batch_open_jobs(engine, batch, tenant="acme") == 0
    view = http.get("/dashboard/api/overview").json()
    assert view["batches"][0]["status"] == "cancelled" and view["batches"][0]["done"] == 3
    again = http.post(f"/dashboard/api/batches/{batch}/cancel", headers=csrf)
    assert again.status_code == 409 and again.json()["error"]["code"] == "batch_state"


def test_login_from_another_site_is_refused_and_logout_clears_the_cookie(dash):
    http, _, keys, _ = dash
    resp = http.post("/dashboard/login", data={"key": keys["a"]}, headers={"Origin": "https://evil.example"},
                     follow_redirects=False)
    assert resp.status_code == 403 and "set-cookie" not in resp.headers
    login(http, keys["a"])
    out = http.post("/dashboard/logout", follow_redirects=False)
    assert out.status_code == 303 and 'llmos_dashboard=""' in out.headers["set-cookie"]
    assert "max-age=0" in out.headers["set-cookie"].lower()
    assert http.get("/dashboard/api/overview").status_code == 401
    assert http.get("/dashboard/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/dashboard/static/../../db.py").status_code == 404
    assert http.get("/dashboard/static/login.html").status_code == 404  # only the page's assets


def test_monitoring_never_imports_the_api():
    import subprocess
    import sys

    code = ("import sys, llmos.monitoring.dashboard.panels, llmos.monitoring.dashboard.session; "
            "print(sorted(m for m in sys.modules if m.startswith(('llmos.api', 'llmos.batches'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_retry_refuses_a_job_whose_deadline_passed(dash):
    http, engine, keys, _ = dash
    (job,) = submit(http, keys["a"])
    fail(engine, job)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job).values(deadline=manager.utcnow() - timedelta(seconds=5)))
    resp = http.post(f"/v1/jobs/{job}/retry", headers=bearer(keys["a"]))
    assert resp.status_code == 409 and "deadline" in resp.json()["error"]["message"], resp.text
    assert manager.get_job(engine, job, tenant="acme").status.value == "failed"
    assert manager.retry_failed(engine, job, tenant="globex") is None  # and another tenant's is none


# --- the review's fixes ------------------------------------------------------------------------

def forged_from_the_database(engine, key, secret=""):
    """A session cookie made from what a copy of the database holds (the key's id and hash), as the
    first version signed it: sha256("llmos-dashboard|" + secret + "|" + hash) as the HMAC key."""
    import hashlib
    import hmac
    import time

    with engine.connect() as conn:
        key_hash = conn.execute(sa.select(api_keys.c.hash).where(api_keys.c.id == key.id)).scalar()
    expires = int(time.time()) + 3600
    mac_key = hashlib.sha256(f"llmos-dashboard|{secret}|{key_hash}".encode()).digest()
    return f"{key.id}.{expires}.{hmac.new(mac_key, f'session|{key.id}|{expires}'.encode(), hashlib.sha256).hexdigest()}"


def test_without_a_secret_the_dashboard_is_off_and_a_database_copy_forges_nothing(sqlite_settings):
    http, engine, keys, _ = make_dash(sqlite_settings)  # the default settings: no LLMOS_API_DASHBOARD_SECRET
    with http:
        page = http.get("/dashboard")
        assert page.status_code == 200 and 'id="dashboard-off"' in page.text
        assert "LLMOS_API_DASHBOARD_SECRET" in page.text and "at least 32" in page.text
        resp = http.post("/dashboard/login", data={"key": keys["root"]}, follow_redirects=False)
        assert resp.status_code == 403 and "set-cookie" not in resp.headers and 'id="dashboard-off"' in resp.text
        root = manager.authenticate_key(engine, keys["root"])
        http.cookies.set(session.COOKIE, forged_from_the_database(engine, root))
        assert http.get("/dashboard/api/overview").status_code == 401  # an admin session from a pg_dump: refused
        assert 'id="dashboard-off"' in http.get("/dashboard").text
        http.cookies.clear()
        assert http.get("/dashboard/api/overview", headers=bearer(keys["root"])).status_code == 200  # Bearer still
    with pytest.raises(ValueError):
        session.make(engine, root, secret="", max_age_s=10)  # never signs with an empty secret


def test_with_the_secret_a_database_copy_still_forges_nothing(dash):
    http, engine, keys, _ = dash
    root = manager.authenticate_key(engine, keys["root"])
    for guess in ("", SECRET[:8]):
        http.cookies.set(session.COOKIE, forged_from_the_database(engine, root, guess))
        assert http.get("/dashboard/api/overview").status_code == 401
    http.cookies.set(session.COOKIE, session.make(engine, root, secret=SECRET, max_age_s=60))
    assert http.get("/dashboard/api/overview").json()["me"]["admin"] is True


def test_dashboard_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMOS_API_DASHBOARD_SECRET", "")  # `NAME=` as deploy/env.example has it: unset
    monkeypatch.setenv("LLMOS_API_METRICS_TOKEN", "")
    api = ApiSettings()
    assert api.dashboard_secret is None and api.metrics_token is None
    monkeypatch.setenv("LLMOS_API_DASHBOARD_SECRET", "too-short")
    with pytest.raises(pydantic.ValidationError, match="dashboard_secret"):
        ApiSettings()
    with pytest.raises(ConfigError, match="LLMOS_API_DASHBOARD_SECRET is invalid: must be at least 32 char") as exc:
        get_api_settings()  # (what `llmos api` and `llmos up` call: one line, not a traceback)
    assert "too-short" not in str(exc.value)  # the value itself is not shown
    monkeypatch.setenv("LLMOS_API_DASHBOARD_SECRET", SECRET)
    monkeypatch.setenv("LLMOS_API_DASHBOARD_ORIGINS", "https://LLMOS.example.com/, http://10.0.0.5:8080")
    api = ApiSettings()
    assert api.dashboard_secret.get_secret_value() == SECRET and SECRET not in repr(api)
    assert api.dashboard_origin_set == {"https://llmos.example.com", "http://10.0.0.5:8080"}
    monkeypatch.setenv("LLMOS_API_DASHBOARD_ORIGINS", "https://llmos.example.com/dashboard")
    with pytest.raises(pydantic.ValidationError, match="not an origin"):
        ApiSettings()


def test_origins_behind_a_proxy_that_rewrites_host(sqlite_settings):
    http, engine, keys, _ = make_dash(sqlite_settings, dashboard_secret=SECRET,
                                      dashboard_origins="https://llmos.example.com")
    public = {"Origin": "https://llmos.example.com"}  # the browser's; Host is the proxy's upstream (testserver)
    with http:
        (job,) = submit(http, keys["a"])
        evil = http.post("/dashboard/login", data={"key": keys["a"]}, headers={"Origin": "https://evil.example"},
                         follow_redirects=False)
        assert evil.status_code == 403
        resp = http.post("/dashboard/login", data={"key": keys["a"]}, headers=public, follow_redirects=False)
        assert resp.status_code == 303, resp.text
        csrf = re.search(r'name="llmos-csrf" content="([0-9a-f]+)"', http.get("/dashboard").text).group(1)
        assert http.post(f"/dashboard/api/jobs/{job}/cancel", headers={session.CSRF_HEADER: csrf,
                                                                        "Origin": "https://evil.example"}).status_code == 403
        ok = http.post(f"/dashboard/api/jobs/{job}/cancel", headers={session.CSRF_HEADER: csrf, **public})
        assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
        # the Host-derived origin still works beside the listed ones
        assert http.post("/dashboard/logout", headers={"Origin": "http://testserver"},
                         follow_redirects=False).status_code == 303


def test_logout_from_another_site_is_refused(dash):
    http, _, keys, _ = dash
    login(http, keys["a"])
    resp = http.post("/dashboard/logout", headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert resp.status_code == 403 and "set-cookie" not in resp.headers
    assert http.get("/dashboard/api/overview").status_code == 200  # still logged in
    assert http.post("/dashboard/logout", headers={"Origin": "http://testserver"},
                     follow_redirects=False).status_code == 303


def test_retry_stands_when_the_broker_is_down_after_the_update(dash, caplog):
    http, engine, keys, dispatcher = dash
    (job,) = submit(http, keys["a"])
    fail(engine, job)

    def down(jobs, chunk=1):
        raise BrokerUnavailableError("cannot reach Redis at redis://127.0.0.1:1/0: refused")

    dispatcher.send = down
    with caplog.at_level(logging.WARNING, logger="llmos.sdk"):
        resp = http.post(f"/v1/jobs/{job}/retry", headers=bearer(keys["a"]))
    assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text  # not 503: the retry happened
    assert manager.get_job(engine, job, tenant="acme").status.value == "queued"
    assert any("send_deferred" in r.getMessage() for r in caplog.records), caplog.text
    fail(engine, job)  # (the dashboard's route too, and the SDK)
    csrf = {session.CSRF_HEADER: login(http, keys["a"])}
    assert http.post(f"/dashboard/api/jobs/{job}/retry", headers=csrf).json()["status"] == "queued"


def test_live_key_by_id(dash):
    _, engine, keys, _ = dash
    key = manager.authenticate_key(engine, keys["a"])
    found, key_hash = manager.live_key_by_id(engine, key.id)
    assert found.id == key.id and found.tenant == "acme" and not found.admin
    with engine.connect() as conn:
        assert key_hash == conn.execute(sa.select(api_keys.c.hash).where(api_keys.c.id == key.id)).scalar()
    assert manager.live_key_by_id(engine, "00000000-0000-0000-0000-000000000000") is None
    assert manager.live_key_by_id(engine, "not-a-uuid") is None
    assert manager.revoke_api_key(engine, key.prefix)
    assert manager.live_key_by_id(engine, key.id) is None
    assert not hasattr(session, "api_keys")  # the session module no longer reads the table itself


def test_the_dashboard_cancels_with_the_v1_routes_message(dash):
    http, engine, keys, _ = dash
    (job,) = submit(http, keys["a"])
    manager.cancel(engine, job, tenant="acme")
    v1 = http.delete(f"/v1/jobs/{job}", headers=bearer(keys["a"]))
    dashboard = http.post(f"/dashboard/api/jobs/{job}/cancel", headers=bearer(keys["a"]))
    assert v1.status_code == dashboard.status_code == 409
    assert v1.json()["error"] == dashboard.json()["error"]


class FakeEngine:
    url = "sqlite:///unit-test-slow-panel"


def run_together(n, fn):
    """`fn()` in n threads started at once; their answers."""
    barrier = threading.Barrier(n)
    out = [None] * n

    def one(i):
        barrier.wait()
        out[i] = fn()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_slow_panels_are_made_once_when_requests_arrive_together(monkeypatch):
    monkeypatch.setattr(panels, "_slow", {})
    monkeypatch.setattr(panels, "_making", {})
    calls = []
    release = threading.Event()

    def make():
        calls.append(1)
        release.wait(0.5)  # slow, as the plan is: the other requests arrive meanwhile
        return {"plan": len(calls)}

    answers = run_together(8, lambda: panels._every("plan", FakeEngine(), make))
    assert len(calls) == 1 and all(value == {"plan": 1} for value, _ in answers), answers
    # expired: one request makes it anew, the others answer the stale value meanwhile (never a second run)
    key = ("plan", FakeEngine.url)
    stamp, value = panels._slow[key]
    panels._slow[key] = (stamp - panels.SLOW_PANEL_S - 1, value)
    answers = run_together(8, lambda: panels._every("plan", FakeEngine(), make))
    assert len(calls) == 2, len(calls)
    assert {v["plan"] for v, _ in answers} <= {1, 2} and {"plan": 2} in [v for v, _ in answers]
    assert all(age == 0.0 for v, age in answers if v == {"plan": 2})
    assert all(age > panels.SLOW_PANEL_S for v, age in answers if v == {"plan": 1})


def test_the_stack_makes_a_private_dashboard_secret_per_home(tmp_path):
    from llmos.stack import dashboard_secret

    home = tmp_path / "home"
    home.mkdir()
    first = dashboard_secret(home)
    assert len(first) == 64 and int(first, 16) >= 0
    path = home / "dashboard.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dashboard_secret(home) == first  # the same on the next start: sessions survive a restart
    assert ApiSettings(dashboard_secret=first).dashboard_secret.get_secret_value() == first
    path.write_text("")
    again = dashboard_secret(home)
    assert len(again) == 64 and again != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["dashboard.secret"]  # no temporary file left
