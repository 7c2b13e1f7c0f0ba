"""Helpers shared by the test layers: service URLs, databases, worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine

PG_ADMIN_URL = os.environ.get("LLMOS_TEST_PG_ADMIN_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
"""A Postgres database the tests connect to in order to create and drop their own."""

REDIS_URL = os.environ.get("LLMOS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
"""The Redis database the integration tests use (flushed by them)."""

REPO = Path(__file__).resolve().parent.parent


def require_postgres() -> None:
    engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as c:
            c.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        raise RuntimeError(
            f"Postgres is required for this test and is not reachable at {PG_ADMIN_URL}: {exc.orig}. "
            "Start it (see .ci/run) or set LLMOS_TEST_PG_ADMIN_URL."
        ) from None
    finally:
        engine.dispose()


def require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.exceptions.ConnectionError as exc:
        raise RuntimeError(
            f"Redis is required for this test and is not reachable at {REDIS_URL}: {exc}. "
            "Start it (see .ci/run) or set LLMOS_TEST_REDIS_URL."
        ) from None


def create_pg_database(prefix: str = "llmos_test") -> str:
    """Create a fresh, empty database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    from llmos.db import dispose_engines

    dispose_engines()
    name = sa.make_url(url).database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def service_env(**values: str) -> dict[str, str]:
    """os.environ without any LLMOS_* of the caller's, plus `values`, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               LLMOS_LOG_LEVEL="WARNING")
    env.update(values)
    return env


class WorkerProcess:
    """A real `llmos worker` process for tests."""

    def __init__(self, env: dict[str, str], model: str = "minilm", concurrency: int | None = None,
                 log_path: Path | None = None) -> None:
        self.env, self.model = env, model
        cmd = [sys.executable, "-m", "llmos.cli", "worker", "--model", model]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
        self.log_path = log_path or Path(env.get("LLMOS_HOME", "/tmp")) / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO)

    def wait_ready(self, db_url: str, timeout: float = 120.0) -> "WorkerProcess":
        engine = get_engine(db_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if any(w["pid"] == self.proc.pid for w in manager.live_workers(engine, self.model)):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self._log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_all_final(engine: sa.Engine, ids: list[str], timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        jobs = manager.get_jobs(engine, ids, tenant=manager.ANY_TENANT)
        if len(jobs) == len(ids) and all(j.status.is_final for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            pending = {j.status for j in jobs.values() if not j.status.is_final}
            raise AssertionError(f"jobs not final after {timeout} s: {pending}")
        time.sleep(0.2)


def count_reads(monkeypatch):
    """Rows read and queries made by the SDK's waits: full rows, statuses, outcomes (what a result needs)."""
    reads = {f"{kind}{what}": 0 for kind in ("full", "status", "outcome") for what in ("", "_queries")}

    def counting(real, kind):
        def counted(*args, **kwargs):
            out = real(*args, **kwargs)
            reads[kind] += len(out)
            reads[kind + "_queries"] += 1
            return out
        return counted
    monkeypatch.setattr(manager, "get_jobs", counting(manager.get_jobs, "full"))
    monkeypatch.setattr(manager, "job_statuses", counting(manager.job_statuses, "status"))
    from llmos.sdk import Client

    monkeypatch.setattr(Client, "_read_outcomes", counting(Client._read_outcomes, "outcome"))
    return reads
