"""The dashboard on SQLite with an in-memory dispatcher: login and its cookie, CSRF, tenants, actions."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings
from llmos.db import get_engine, jobs
from llmos.dispatch import InMemoryDispatcher
from llmos.monitoring.dashboard import STATIC, panels, session
from llmos.sdk import Client

SENTIMENT = {"model": "minilm", "task": "sentiment", "input": {"text": "lovely"}}


@pytest.fixture
def dash(sqlite_settings):
    dispatcher = InMemoryDispatcher()
    client = Client(sqlite_settings, dispatcher=dispatcher)
    app = create_app(api_settings=ApiSettings(rate_limit_storage="memory://"), client=client)
    engine = get_engine(sqlite_settings.db_url)
    keys = {name: manager.create_api_key(engine, tenant=tenant, admin=admin)[1]
            for name, tenant, admin in (("a", "acme", False), ("b", "globex", False), ("root", "ops", True))}
    with TestClient(app, base_url="http://testserver") as http:
        yield http, engine, keys, dispatcher


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
    old = session.make(engine, key, secret="", max_age_s=10, now=0)
    assert session.verify(engine, old, secret="") is None
    assert session.verify(engine, session.make(engine, key, secret="", max_age_s=10), secret="") is not None
    assert session.verify(engine, session.make(engine, key, secret="x", max_age_s=10), secret="y") is None


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
