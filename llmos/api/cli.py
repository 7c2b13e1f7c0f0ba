"""`llmos api` (serve the REST API with uvicorn) and `llmos keys create/list/revoke`.

Registered in `llmos.cli`; `python -m llmos.api.cli` runs the same commands on their own.
"""

from __future__ import annotations

import json
import socket
from typing import Annotated, Optional

import typer

from llmos.settings import get_settings

keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="API keys (stored hashed).")


def api_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="API processes (they share nothing but the database and Redis).")] = 1,
) -> None:
    """Serve the REST API (see docs/api.md)."""
    import uvicorn

    from llmos.api.settings import get_api_settings

    get_api_settings()  # a bad [tenants] or [shedding] table in llmos.toml stops here, before uvicorn
    check_port(host, port, "pass --port N")
    uvicorn.run("llmos.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=get_settings().log_level.lower(),
                timeout_graceful_shutdown=5)  # open event streams and long polls end after 5 s


def check_port(host: str, port: int, hint: str) -> None:
    """LLMOSError if nothing can listen on `host`:`port` now (another server holds it)."""
    from llmos.errors import LLMOSError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LLMOSError(f"cannot serve the API on {host}:{port}: {exc.strerror or exc} "
                             f"(is another API or `llmos up` running there?); {hint}") from None


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    name: Annotated[Optional[str], typer.Option(help="A label for the key.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May manage keys and (later) monitoring routes.")] = False,
) -> None:
    """Create a key and print it: it is shown only this once (only its hash is stored)."""
    from llmos import manager

    key, secret = manager.create_api_key(_engine(), tenant=tenant, name=name, admin=admin)
    typer.echo(secret)
    typer.echo(f"prefix {key.prefix}, tenant {key.tenant}{', admin' if key.admin else ''}: "
               "store the key now, it cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="One line of JSON.")] = False) -> None:
    """Every key: prefix, tenant, name, admin, created, revoked, last used (never the secret)."""
    from llmos import manager

    keys = manager.list_api_keys(_engine())
    if as_json:
        typer.echo(json.dumps([{"prefix": k.prefix, "tenant": k.tenant, "name": k.name, "admin": k.admin,
                                "created_at": k.created_at.isoformat(),
                                "revoked_at": k.revoked_at and k.revoked_at.isoformat(),
                                "last_used_at": k.last_used_at and k.last_used_at.isoformat()} for k in keys]))
        return
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live"
        typer.echo(f"{k.prefix}  {k.tenant}  {k.name or '-'}  {'admin' if k.admin else 'user'}  "
                   f"created {k.created_at:%Y-%m-%d %H:%M}  {state}")


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix (`llmos keys list`).")]) -> None:
    """Revoke a key: the API refuses it from the next request on."""
    from llmos import manager
    from llmos.api.errors import KeyNotFoundError

    if not manager.revoke_api_key(_engine(), prefix):
        raise KeyNotFoundError(f"no live API key with prefix {prefix!r}")
    typer.echo(f"revoked {prefix}")


def _engine():
    from llmos.db import check_database, get_engine

    url = get_settings().db_url
    check_database(url)
    return get_engine(url)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="The LLMOS REST API and its keys.")
app.command("api")(api_command)
app.add_typer(keys_app, name="keys")


def main(argv: list[str] | None = None) -> None:
    """Run `app` with the errors handled as `llmos` handles them."""
    import sys

    from llmos.errors import LLMOSError
    from llmos.logs import setup

    setup()
    try:
        app(args=argv, prog_name="llmos")  # standalone: usage errors exit 2 with the usage line
    except LLMOSError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
