"""The API against its own OpenAPI schema: schemathesis over every operation of `/openapi.json`.

A real API process (uvicorn on a free port, Postgres, Redis) and an admin key, so the key routes
are exercised too; no worker (no generated request is a job a worker could run). Schemathesis's
CLI runs in a subprocess with a fixed seed and a bounded number of examples; the test fails with
its report when a response is a 5xx, has a status code the schema does not document, a wrong
content type or headers, or a body that does not match the schema. Operations are read from the
schema, so a new route is covered without a change here.
"""

from __future__ import annotations

import json
import os
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

MAX_EXAMPLES = 150
"""Test cases per operation in the fuzzing phase (the coverage phase adds its boundary cases)."""

SEED = 12
"""Hypothesis seed of the run: the same cases every time."""

CHECKS = ",".join([
    "not_a_server_error",            # no 5xx
    "status_code_conformance",       # every status code answered is documented
    "content_type_conformance",      # the documented media type
    "response_headers_conformance",  # documented headers present and of their schema
    "response_schema_conformance",   # the body matches the documented schema
    "negative_data_rejection",       # a request outside the schema is a 4xx
    "missing_required_header",
    "unsupported_method",            # a method a path lacks is a 405 with Allow
    "allow_header_conformance",      # ... listing exactly the methods of the path
    "ignored_auth",                  # no key / a bad key is refused (401)
])
"""Not `positive_data_acceptance`: schema-valid requests are refused with a 422 by design where the
schema cannot say why (an unknown model or task name, a task's own input fields, a cursor we did
not make), and not the checks that need resources made by earlier calls (the stateful phase)."""

HOOKS = '''
import os
import schemathesis

PROTECTED = os.environ["LLMOS_SCHEMA_KEY_PREFIX"]
FAILED, SUCCEEDED = os.environ["LLMOS_SCHEMA_FAILED_JOB"], os.environ["LLMOS_SCHEMA_SUCCEEDED_JOB"]


@schemathesis.hook
def before_call(context, case, kwargs):
    """Never revoke the key the run authenticates with (GET /v1/keys shows its prefix), and never
    retry the seeded failed job (queued again, a wait or event stream on it would not end): a
    retry of it asks for the succeeded one's (a 409) instead."""
    params = case.path_parameters or {}
    if params.get("prefix") == PROTECTED:
        params["prefix"] = "0" * len(PROTECTED)
    if case.path.endswith("/retry") and params.get("job_id") == FAILED:
        params["job_id"] = SUCCEEDED
'''
"""Schemathesis hooks of the run (SCHEMATHESIS_HOOKS), written to a file beside its report."""

CONFIG = '''
[dictionaries.jobs]
values = {job_ids}

[parameters]
"path.job_id" = {{ dictionary = "jobs", probability = 0.5 }}

[[operations]]
include-path-regex = "^/v1/((chat/)?completions|embeddings)$"
include-method = "POST"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
'''
"""Schemathesis config of the run: half the generated job ids are those of `final_jobs`; the
OpenAI-compatible routes may answer their documented 503 no_worker (this run has no worker, and
they answer at once rather than queue a job nobody runs, docs/openai.md)."""


@pytest.fixture(scope="module")
def schema_api(services, tmp_path_factory):
    """One API process on the module's Postgres and Redis, with a rate limit no run reaches and
    no webhook deliveries (nothing leaves the machine)."""
    settings, env = services
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("schema-api") / "api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmos.api.cli", "api", "--port", str(port)],
                                env={**env, "LLMOS_API_RATE_LIMIT": "100000/second",
                                     "LLMOS_API_MAX_BODY_BYTES": str(2**20),
                                     # a generated job may name any webhook URL: deliver none
                                     "LLMOS_API_WEBHOOK_DELIVER": "false"},
                                cwd=helpers.REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"API exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API not ready after 60 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url, get_engine(settings.db_url), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def final_jobs(url: str, engine, headers: dict[str, str]) -> list[str]:
    """A succeeded, a failed and a cancelled job of the key's tenant (final: a wait or an event
    stream on them answers at once), so the job routes answer 200 and 409 with real rows too."""
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        ids = []
        for i in range(3):
            resp = http.post("/v1/jobs", json={"model": "minilm", "task": "sentiment", "priority": "low",
                                               "input": {"text": f"seed {i}"}, "timeout_s": 60})
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
        claimed, _ = manager.claim(engine, ids[:2], worker_id="schema-check", device="cpu")
        assert len(claimed) == 2
        assert manager.finish(engine, [
            manager.Outcome(job_id=ids[0], worker_id="schema-check", attempt=1,
                            result={"label": "POSITIVE", "score": 0.9}, compute_ms=1.0),
            manager.Outcome(job_id=ids[1], worker_id="schema-check", attempt=1,
                            error="RuntimeError: seeded failure")]) == 2
        assert http.delete(f"/v1/jobs/{ids[2]}").status_code == 200
    return ids


def test_every_operation_conforms_to_the_schema(schema_api, tmp_path):
    url, engine, log_path = schema_api
    key, secret = manager.create_api_key(engine, tenant="schema-check", name="schemathesis", admin=True)
    ids = final_jobs(url, engine, {"Authorization": f"Bearer {secret}"})
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(job_ids=json.dumps(ids)))
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
           "--header", f"Authorization: Bearer {secret}",
           "--checks", CHECKS,
           "--phases", "examples,coverage,fuzzing",
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
           "--workers", "1", "--request-timeout", "20",
           "--generation-database", "none", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "LLMOS_SCHEMA_KEY_PREFIX": key.prefix,
           "LLMOS_SCHEMA_SUCCEEDED_JOB": ids[0], "LLMOS_SCHEMA_FAILED_JOB": ids[1]}
    started = time.monotonic()
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    report = run.stdout + run.stderr
    print(report)  # shown with -s or -rP: what was tested
    assert run.returncode == 0, (f"schemathesis found problems (exit {run.returncode}, {took:.0f} s):\n{report}\n"
                                 f"--- API log (tail) ---\n{log_path.read_text(errors='replace')[-5000:]}")
    assert "Tested:" in report and "Authentication failed" not in report, report
    assert manager.authenticate_key(engine, secret) is not None  # the run kept its own key


def test_what_the_schema_check_found_stays_fixed(schema_api):
    """Each answer schemathesis once flagged, checked directly (a clearer failure than its report)."""
    url, engine, _ = schema_api
    _, secret = manager.create_api_key(engine, tenant="schema-fixed")
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        # a 405's Allow lists every method of the path, not those of one route
        resp = http.request("OPTIONS", "/v1/jobs")
        assert resp.status_code == 405 and resp.headers["Allow"] == "GET, POST", resp.headers
        assert http.request("PATCH", "/v1/jobs/x").headers["Allow"] == "DELETE, GET"
        # a body that is not UTF-8 is malformed JSON: 422, not an undocumented 400
        resp = http.post("/v1/jobs", content=b"\xff{", headers={"Content-Type": "application/json"})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_request", resp.text
        # created_since is an ISO 8601 date-time, not Unix seconds
        resp = http.get("/v1/jobs", params={"created_since": "0.5"})
        assert resp.status_code == 422 and "created_since" in resp.json()["error"]["message"], resp.text
        assert http.get("/v1/jobs", params={"created_since": "2026-01-01T00:00:00Z"}).status_code == 200
        # a retry answers the job re-queued (the schema's JobOut), then 409 job_state
        (failed,) = [j for j in final_jobs(url, engine, auth) if manager.get_job(engine, j, tenant="schema-fixed")
                     .status.value == "failed"]
        resp = http.post(f"/v1/jobs/{failed}/retry")
        assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
        again = http.post(f"/v1/jobs/{failed}/retry")
        assert again.status_code == 409 and again.json()["error"]["details"] == {"status": "queued"}, again.text
        assert http.delete(f"/v1/jobs/{failed}").status_code == 200  # (final again)
