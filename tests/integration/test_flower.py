"""`llmos flower` against a real worker: tasks from sent to SUCCESS, queue lengths, credentials.

A real Flower subprocess (a free port) on the module's Redis/Postgres and a real minilm worker,
both with LLMOS_TASK_EVENTS=1; this process submits with task events on too, so its messages'
"task-sent" events reach Flower.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import pytest
import redis

import llmos
from llmos import manager
from llmos.dispatch import queue_keys, queue_name
from llmos.errors import NoWorkerWarning
from llmos.sdk import Client
from llmos.settings import Settings
from tests import helpers

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "flower-test-pw"
IDLE_MODEL = "sst2"  # registered, no worker in this module: its jobs stay queued


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


GOOD = _auth(USER, PASSWORD)


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    req = urllib.request.Request(base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body.strip().startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class FlowerProcess:
    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "flower", "--port", "0", *args],
                                     env=env, cwd=helpers.REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        seen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen += line
            m = re.search(r"Flower listening on (http://[\d.]+:\d+)/", line)
            if m:
                self.base = m.group(1)
                return
        self.proc.kill()
        raise RuntimeError(f"flower did not start (exit {self.proc.poll()}):\n{seen}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def stack(services):
    settings, env = services
    env = {**env, "LLMOS_TASK_EVENTS": "1"}
    worker = helpers.WorkerProcess(env).wait_ready(settings.db_url)
    flower = FlowerProcess(env, "--basic-auth", f"{USER}:{PASSWORD}", "--admin-keys")
    client = Client(Settings(home=settings.home, database_url=settings.database_url,
                             redis_url=settings.redis_url, task_events=True))
    # Flower prints its port before its event receiver has subscribed (Redis pub/sub keeps
    # nothing): until a probe job's "task-sent" event shows, Flower may miss a job's first events
    deadline = time.monotonic() + 60
    while True:
        before = set(get(flower.base, "/api/tasks", GOOD)[1])
        probe = client.load_model("minilm").submit(llmos.SentimentTask(text="probe"))
        probe.result(timeout=60)
        task = wait_task(flower.base, lambda t: t["uuid"] not in before and t["state"] == "SUCCESS")
        if probe.id in (task.get("args") or "") and task["sent"]:
            break
        assert time.monotonic() < deadline, f"Flower never saw a task's sent event: {task}"
        time.sleep(0.5)
    yield settings, client, flower
    client.close()
    flower.stop()
    assert worker.stop() == 0, worker.log()


def wait_task(base: str, want, timeout: float = 60.0) -> dict:
    """The first task in Flower's /api/tasks for which `want(task)` holds (polled)."""
    deadline = time.monotonic() + timeout
    tasks: object = None
    while time.monotonic() < deadline:
        code, tasks = get(base, "/api/tasks", GOOD)
        assert code == 200, tasks
        for task in tasks.values():
            if want(task):
                return task
        time.sleep(0.3)
    raise AssertionError(f"no such task in Flower after {timeout} s: {tasks}")


def test_finished_job_message_listed_with_success_model_and_job_id(stack):
    settings, client, flower = stack
    handle = client.load_model("minilm").submit(llmos.SentimentTask(text="I love it"))
    handle.result(timeout=60)
    task = wait_task(flower.base, lambda t: handle.id in (t.get("args") or "") and t["state"] == "SUCCESS")
    assert task["name"] == "llmos.run_job"
    assert task["args"] == repr([handle.id])
    assert task["routing_key"] == queue_name("minilm")  # from our producer's "task-sent" event
    assert task["sent"] and task["received"] and task["started"] and task["succeeded"]
    assert task["worker"].startswith("minilm@")


def test_bulk_message_lists_every_job_id_it_carries(stack):
    settings, client, flower = stack
    handles = client.load_model("minilm").submit_many(
        [llmos.SentimentTask(text=t) for t in ("good", "bad", "fine")])
    for h in handles:
        h.result(timeout=60)
    ids = [h.id for h in handles]
    task = wait_task(flower.base, lambda t: ids[0] in (t.get("args") or "") and t["state"] == "SUCCESS")
    assert task["args"] == repr([ids])  # one message, three jobs
    assert task["sent"] and task["routing_key"] == queue_name("minilm")


def test_queue_lengths_cover_every_priority_list(stack):
    settings, client, flower = stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoWorkerWarning)
        for priority in (9, 5, 1):  # three different lists: llmos.sst2, llmos.sst2:4, llmos.sst2:8
            client.submit(IDLE_MODEL, [llmos.SentimentTask(text="waits")], priority=priority)
    r = redis.Redis.from_url(settings.redis_url)
    lengths = {k: r.llen(k) for k in queue_keys(IDLE_MODEL)}
    assert sum(1 for n in lengths.values() if n) == 3, lengths
    code, body = get(flower.base, "/api/queues/length", GOOD)
    assert code == 200, body
    queues = {q["name"]: q["messages"] for q in body["active_queues"]}
    assert queues[queue_name(IDLE_MODEL)] == sum(lengths.values()) == 3
    assert queues[queue_name("minilm")] == 0  # served: its messages were taken
    assert queue_name("squad") in queues  # every registered model's queue is listed


def test_credentials_required(stack):
    settings, client, flower = stack
    for path in ("/api/tasks", "/api/queues/length", "/api/workers", "/"):
        for headers in (None, _auth(USER, "wrong"), _auth("admin", "llmos_nope_nope"),
                        {"Authorization": "Bearer " + PASSWORD}):
            code, _ = get(flower.base, path, headers)
            assert code == 401, (path, headers, code)
    assert get(flower.base, "/api/tasks", GOOD)[0] == 200
    assert get(flower.base, "/healthcheck")[0] == 200  # the compose file's healthcheck, no credentials


def test_admin_api_key_logs_in_as_admin_and_a_tenant_key_does_not(stack):
    settings, client, flower = stack
    engine = client.engine
    admin_row, admin_key = manager.create_api_key(engine, tenant="ops", admin=True)
    _, tenant_key = manager.create_api_key(engine, tenant="acme")
    assert get(flower.base, "/api/queues/length", _auth("admin", admin_key))[0] == 200
    assert get(flower.base, "/api/queues/length", _auth("admin", tenant_key))[0] == 401
    assert get(flower.base, "/api/queues/length", _auth("ops", admin_key))[0] == 401  # user must be admin
    assert manager.revoke_api_key(engine, admin_row.prefix)
    assert get(flower.base, "/api/queues/length", _auth("admin", admin_key))[0] == 401  # at once


def test_refuses_to_start_without_credentials(services):
    settings, env = services
    proc = subprocess.run([sys.executable, "-m", "llmos.cli", "flower", "--port", "0"], env=env,
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Flower needs credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_taken_port_is_a_clear_error(stack, services):
    settings, env = services
    _, _, flower = stack
    taken = int(flower.base.rsplit(":", 1)[1])  # the running Flower holds it
    proc = subprocess.run([sys.executable, "-m", "llmos.cli", "flower", "--port", str(taken),
                           "--basic-auth", f"{USER}:{PASSWORD}"], env=env,
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot listen on 127.0.0.1:{taken}" in proc.stderr and "--port" in proc.stderr
    assert "Traceback" not in proc.stderr
