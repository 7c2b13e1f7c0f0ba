"""The `llmos flower` command (registered by llmos/cli.py): Flower on LLMOS's own Celery app.

Flower runs on `llmos.dispatch.make_celery`'s app (our transport, JSON, the priority steps and
separator of `broker_transport_options`), so its broker view sums the same ten lists per model
(`llmos.<model>`, `llmos.<model>:1` … `:9`) that `llmos.dispatch.queue_keys` names. Two things
are set for it here:

- **Queue names.** Flower lists queue lengths for the queues its workers report over remote
  control, else for the app's `task_queues`. LLMOS workers run without remote control (no pidbox
  consumer beside the model), so the app gets one `task_queues` entry per registered model.
- **The broker class.** Flower picks its broker client by URL scheme and knows `redis://`,
  `redis+socket://`, `rediss://`; our transport's `llmos-redis://` is the same Redis with the
  same keys, so the URL Flower's broker client reads is the plain one (`broker_url_for_flower`).

Credentials are required, never optional: Flower's API can run and revoke tasks. Either static
`user:password` pairs (`--basic-auth`, LLMOS_FLOWER_BASIC_AUTH, comma-separated: Flower's own
basic auth), or `--admin-keys` (LLMOS_FLOWER_ADMIN_KEYS=1): user `admin`, password an admin API
key, checked against the keys table on every request (a revoked key stops working at once). Both
may be on. Without either the command refuses to start (ConfigError, exit 2).

What Flower shows and what only the task table knows: docs/operations.md, "Flower".
"""

from __future__ import annotations

import hmac
import logging
import signal
import sys
from base64 import b64decode
from typing import Annotated, Any, Optional

import typer

from llmos.errors import ConfigError
from llmos.settings import Settings

log = logging.getLogger("llmos.flower")

ADMIN_USER = "admin"
"""The user name of `--admin-keys` credentials (the password is an admin API key)."""

TASKS_COLUMNS = "name,uuid,state,args,received,started,runtime,worker"
"""Flower's task list columns: `args` shows the job ids a message carries."""


def broker_url_for_flower(settings: Settings) -> str:
    """The broker URL in the scheme Flower's broker client knows (same Redis, same keys)."""
    url = settings.broker_url
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://"):]
    return url


def parse_basic_auth(values: list[str]) -> list[str]:
    """`user:password` pairs (each value may hold several, comma-separated), checked."""
    pairs = [p.strip() for v in values for p in v.split(",") if p.strip()]
    for p in pairs:
        user, sep, password = p.partition(":")
        if not sep or not user or not password:
            raise ConfigError("Flower basic auth takes user:password (both non-empty), e.g. "
                              "--basic-auth ops:$(openssl rand -hex 16)")
    return pairs


def make_app(settings: Settings, models: list[str] | None = None):
    """LLMOS's Celery app, as Flower should see it: every model's queue declared."""
    from kombu import Queue

    from llmos.dispatch import make_celery, queue_name

    if models is None:
        from llmos.registry import Registry

        models = Registry.load(settings).names()
    app = make_celery(settings)
    app.conf.task_queues = [Queue(queue_name(m)) for m in models]
    return app


class Credentials:
    """Checks a request's `Authorization: Basic` header: a static pair, or admin + admin key."""

    def __init__(self, static: list[str], engine: Any = None) -> None:
        self.static = [s.encode() for s in static]
        self.engine = engine  # set: `admin:<admin key>` is checked against the keys table

    def user(self, header: str) -> str | None:
        kind, _, encoded = header.partition(" ")
        if kind != "Basic" or not encoded:
            return None
        try:
            raw = b64decode(encoded.strip(), validate=True)
        except ValueError:
            return None
        if any(hmac.compare_digest(s, raw) for s in self.static):  # every pair, constant time each
            return raw.split(b":", 1)[0].decode(errors="replace")
        if self.engine is not None:
            try:
                user, _, password = raw.decode().partition(":")
            except UnicodeDecodeError:
                return None
            if user == ADMIN_USER and password:
                from llmos import manager

                try:
                    key = manager.authenticate_key(self.engine, password)
                except Exception as exc:  # the database is away: no admin key checks (static pairs still work)
                    log.warning("admin key not checked: %s", exc.__class__.__name__)
                    return None
                if key is not None and key.admin:
                    return f"{ADMIN_USER} ({key.prefix})"
        return None


def install_auth(credentials: Credentials) -> None:
    """Flower's handlers check our credentials (basic auth with a static list, or an admin key).

    Flower's own basic auth compares a static list; an admin key needs a lookup, so every
    handler's `get_current_user` (Flower's one hook for both its pages and its API) is ours.
    The options keep a non-empty `basic_auth`, so Flower's own guards (its API's refusal when
    no auth is configured, its cross-site checks on POSTs) treat this instance as authenticated.
    """
    import tornado.web
    from flower.views import BaseHandler

    def get_current_user(self):  # noqa: ANN001
        user = credentials.user(self.request.headers.get("Authorization", ""))
        if user is None:
            raise tornado.web.HTTPError(401)
        return user

    BaseHandler.get_current_user = get_current_user


def build(settings: Settings, *, port: int, address: str, basic_auth: list[str], admin_keys: bool,
          read_only: bool = False, models: list[str] | None = None):
    """A Flower application ready to `start_http_server()` and `start()`, or ConfigError."""
    static = parse_basic_auth(basic_auth)
    if not static and not admin_keys:
        raise ConfigError(
            "Flower needs credentials (its API can run and revoke tasks): give --basic-auth "
            "user:password (or LLMOS_FLOWER_BASIC_AUTH), or --admin-keys (or LLMOS_FLOWER_ADMIN_KEYS=1) "
            "to log in as user 'admin' with an admin API key")
    try:
        from flower.app import Flower
        from flower.options import default_options as options
        from flower.urls import settings as tornado_settings
    except ImportError:
        raise ConfigError("Flower is not installed: pip install 'llmos[flower]'") from None
    engine = None
    if admin_keys:
        from llmos.db import get_engine

        engine = get_engine(settings.db_url)
    install_auth(Credentials(static, engine))
    app = make_app(settings, models)
    options.port = port
    options.address = address
    # non-empty, so Flower's own guards see an authenticated instance; our hook does the check
    options.basic_auth = static or [f"{ADMIN_USER}:"]
    options.enable_events = False  # workers send events by LLMOS_TASK_EVENTS, not remote control
    options.read_only = read_only
    options.tasks_columns = TASKS_COLUMNS
    # Flower's broker client by the plain scheme; the app's own connection stays on our transport
    _patch_broker_url(broker_url_for_flower(settings))
    return Flower(capp=app, options=options, **tornado_settings)


def _patch_broker_url(url: str) -> None:
    """Flower's broker view reads `broker_uri_with_password`: the plain-scheme URL of our Redis."""
    from flower.app import Flower

    Flower.broker_uri_with_password = property(lambda self: url)  # type: ignore[assignment]


def flower_command(
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one, printed).")] = 5555,
        address: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a container behind a proxy).")] = "127.0.0.1",
        basic_auth: Annotated[Optional[list[str]], typer.Option("--basic-auth", metavar="USER:PASSWORD", envvar="LLMOS_FLOWER_BASIC_AUTH", help="Credentials (repeatable; the variable takes several, comma-separated).")] = None,
        admin_keys: Annotated[bool, typer.Option("--admin-keys", envvar="LLMOS_FLOWER_ADMIN_KEYS", help="Also let in user 'admin' with any live admin API key as password (checked against the keys table on each request).")] = False,
        read_only: Annotated[bool, typer.Option("--read-only", envvar="LLMOS_FLOWER_READ_ONLY", help="Flower's read-only mode: no revoke, no task runs from its API.")] = False) -> None:
    """Start Flower on LLMOS's Celery app (task events need LLMOS_TASK_EVENTS=1 on workers and producers); credentials required."""
    from llmos.logs import setup
    from llmos.settings import get_settings

    settings = get_settings()
    setup(settings.log_level)
    if not settings.task_events:
        print("warning: LLMOS_TASK_EVENTS is off: workers and producers send no task events, so Flower "
              "lists no tasks (queue lengths still work)", file=sys.stderr, flush=True)
    flower = build(settings, port=port, address=address, basic_auth=list(basic_auth or []),
                   admin_keys=admin_keys, read_only=read_only)
    try:
        bound = flower.start_http_server()
    except OSError as exc:  # the port is taken, or the address is not this host's
        raise ConfigError(f"Flower cannot listen on {address}:{port}: {exc.strerror or exc}; "
                          "pass --port N (or --address)") from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as Flower's own command: leave the loop
    print(f"Flower listening on http://{address}:{bound}/ (broker {_redacted(settings)})", flush=True)
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()


def _redacted(settings: Settings) -> str:
    from llmos.settings import redact

    return redact(settings.broker_url)
