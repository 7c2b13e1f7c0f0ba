"""The dashboard: its page and files, the login and logout, its JSON panels and its three actions.

`GET /dashboard` answers the page to a logged-in browser and the login form to anyone else;
without LLMOS_API_DASHBOARD_SECRET (the sessions' signing secret, never in the database) it
answers a page saying the dashboard is off and how to turn it on, and no login is accepted.
`POST /dashboard/login` takes an API key from the form, checks it (`manager.authenticate_key`)
and sets a signed session cookie (llmos.monitoring.dashboard.session: the key itself is never
stored in the browser) that is HttpOnly, SameSite=Strict, Path=/dashboard, Secure over https
(the request's scheme or X-Forwarded-Proto) and expires after LLMOS_API_DASHBOARD_SESSION_S.
`/dashboard/api/...` answers JSON to the cookie or to `Authorization: Bearer <key>`.

The actions (cancel a job, retry a failed one, cancel a batch) are POSTs. With the cookie they
also need the header X-LLMOS-CSRF carrying the session's CSRF token (the page has it in a meta
tag; a token derived from the session, so nothing is stored), and a cross-site Origin is refused
(the login and logout too; allowed: the Host header's origin and LLMOS_API_DASHBOARD_ORIGINS):
SameSite=Strict already keeps the cookie off cross-site requests, the header is the second lock
(a form on another site cannot set a header). Bearer calls carry no ambient credential and need
no token. Every answer is no-store and the page's Content-Security-Policy allows this origin only.

The routes are left out of /openapi.json: the page is the interface, not a public API.
"""

from __future__ import annotations

import html
import urllib.parse
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from llmos import manager
from llmos.api.deps import ClientDep
from llmos.api.errors import AuthError, ForbiddenError
from llmos.api.routes.jobs import cancel_or_409
from llmos.api.settings import ApiSettings
from llmos.batches import core as batch_core
from llmos.batches.errors import BatchNotFoundError
from llmos.errors import JobNotFoundError
from llmos.manager import ApiKey
from llmos.monitoring.dashboard import STATIC, panels, session
from llmos.monitoring.dashboard.panels import Scope
from llmos.sdk import Client

router = APIRouter(prefix="/dashboard", include_in_schema=False)

ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # (no-referrer would make a form POST's Origin "null")
}
"""Headers of every dashboard answer: nothing cached, nothing loaded or framed from elsewhere."""


def _https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _same_origin(request: Request) -> bool:
    """False for a POST whose Origin is another site's (or "null"); True when none is sent.

    Allowed: the origin the Host header names, and LLMOS_API_DASHBOARD_ORIGINS (the public
    origin behind a proxy that rewrites Host)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    origin = origin.strip().lower()
    host = request.headers.get("host", "").lower()
    return origin in (f"http://{host}", f"https://{host}") or origin in _api(request).dashboard_origin_set


def _secret(request: Request) -> str | None:
    """LLMOS_API_DASHBOARD_SECRET, or None: then the dashboard accepts no login (its page says why)."""
    secret = _api(request).dashboard_secret
    return None if secret is None else secret.get_secret_value()


def _api(request: Request) -> ApiSettings:
    return request.app.state.api_settings


def _read(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _off_page(status: int = 200) -> HTMLResponse:
    """What /dashboard answers without LLMOS_API_DASHBOARD_SECRET: it is off, and how to turn it on."""
    return HTMLResponse(_read("off.html"), status_code=status, headers=HEADERS)


def _login_page(error: str | None = None, status: int = 200) -> HTMLResponse:
    text = _read("login.html").replace(
        "{{error}}", "" if error is None else f'<p class="error" id="login-error">{html.escape(error)}</p>')
    return HTMLResponse(text, status_code=status, headers=HEADERS)


class Caller:
    """Who calls: the key, its CSRF token (None for a Bearer call) and the scope it sees."""

    def __init__(self, key: ApiKey, csrf: str | None, tenant_filter: str | None) -> None:
        self.key = key
        self.csrf = csrf
        tenant = (tenant_filter or None) if key.admin else key.tenant
        self.scope = Scope(tenant=tenant, admin=key.admin)

    def tenant_of_job(self, client: Client, job_id: str) -> str:
        tenant = panels.job_tenant(client.engine, job_id) if self.key.admin else self.key.tenant
        if tenant is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return tenant


def _caller(request: Request, client: Client) -> Caller | None:
    """The caller by Bearer key or session cookie; None when neither is valid."""
    auth = request.headers.get("authorization", "")
    tenant_filter = request.query_params.get("tenant")
    if auth[:7].lower() == "bearer ":
        key = manager.authenticate_key(client.engine, auth[7:].strip())
        return None if key is None else Caller(key, None, tenant_filter)
    cookie = request.cookies.get(session.COOKIE)
    secret = _secret(request)
    if cookie is None or secret is None:
        return None
    found = session.verify(client.engine, cookie, secret=secret)
    return None if found is None else Caller(found[0], found[1], tenant_filter)


def get_caller(request: Request, client: ClientDep) -> Caller:
    caller = _caller(request, client)
    if caller is None:
        raise AuthError("not logged in: open /dashboard and log in with an API key (or send a Bearer key)")
    api = _api(request)
    request.app.state.rate_limiter.hit(caller.key.tenant, api.quota(caller.key.tenant))
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_actor(request: Request, caller: CallerDep) -> Caller:
    """A caller allowed to change state: a Bearer key, or the cookie with its CSRF header, same origin."""
    if not _same_origin(request):
        raise ForbiddenError("cross-site request refused")
    if caller.csrf is not None and not session.csrf_ok(caller.csrf, request.headers.get(session.CSRF_HEADER)):
        raise ForbiddenError(f"missing or wrong {session.CSRF_HEADER} header (reload the dashboard)")
    return caller


ActorDep = Annotated[Caller, Depends(get_actor)]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=HEADERS)


# --- the page ------------------------------------------------------------------------------------

@router.get("")
def page(request: Request, client: ClientDep) -> Response:
    """The dashboard to a logged-in browser; the login form otherwise (the "off" page without a secret)."""
    if _secret(request) is None:
        return _off_page()
    caller = _caller(request, client)
    if caller is None or caller.csrf is None:
        return _login_page()
    api = _api(request)
    text = (_read("dashboard.html").replace("{{csrf}}", html.escape(caller.csrf))
            .replace("{{refresh_s}}", f"{api.dashboard_refresh_s:g}")
            .replace("{{tenant}}", html.escape(caller.key.tenant))
            .replace("{{admin}}", "true" if caller.key.admin else "false"))
    return HTMLResponse(text, headers=HEADERS)


@router.get("/static/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        return _json({"error": {"code": "not_found", "message": f"no file {name!r}", "details": {},
                                "type": "invalid_request_error", "param": None}}, 404)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={**HEADERS, "Cache-Control": "no-cache"})


@router.post("/login")
async def login(request: Request, client: ClientDep) -> Response:
    """The form's key checked; a session cookie and the page, or the form again with why (401)."""
    secret = _secret(request)
    if secret is None:
        return _off_page(403)
    if not _same_origin(request):
        return _login_page("cross-site login refused", 403)
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    key_text = (form.get("key") or [""])[0].strip()
    key = await run_in_threadpool(manager.authenticate_key, client.engine, key_text) if key_text else None
    if key is None:
        return _login_page("That key is not valid (unknown, revoked or mistyped).", 401)
    api = _api(request)
    value = await run_in_threadpool(session.make, client.engine, key, secret=secret,
                                    max_age_s=api.dashboard_session_s)
    if value is None:  # revoked between the check and now
        return _login_page("That key is not valid (unknown, revoked or mistyped).", 401)
    resp = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    resp.set_cookie(session.COOKIE, value, max_age=api.dashboard_session_s, path="/dashboard", httponly=True,
                    samesite="strict", secure=_https(request))
    return resp


@router.post("/logout")
def logout(request: Request) -> Response:
    """Delete the cookie in the browser (a copy of it stays valid until its expiry: revoke the key,
    or change the secret, to end it). A cross-site POST is refused, as for every POST here."""
    if not _same_origin(request):
        return _login_page("cross-site logout refused", 403)
    resp = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    resp.delete_cookie(session.COOKIE, path="/dashboard", httponly=True, samesite="strict", secure=_https(request))
    return resp


# --- data ----------------------------------------------------------------------------------------

@router.get("/api/overview")
def overview(caller: CallerDep, client: ClientDep) -> JSONResponse:
    """Every panel, scoped to the caller (an admin's `?tenant=` filter)."""
    data = panels.overview(client.engine, caller.scope, settings=client.settings, registry=client.registry,
                           redis_conn=client.redis if caller.scope.admin else None)
    data["me"] = {"tenant": caller.key.tenant, "admin": caller.key.admin, "key": caller.key.prefix}
    return _json(data)


@router.get("/api/jobs/{job_id}")
def job_timeline(job_id: str, caller: CallerDep, client: ClientDep) -> JSONResponse:
    found = panels.timeline(client.engine, caller.scope, job_id)
    if found is None:
        raise JobNotFoundError(f"no job with id {job_id!r}")
    return _json(found)


@router.post("/api/jobs/{job_id}/cancel")
def cancel_job(job_id: str, caller: ActorDep, client: ClientDep) -> JSONResponse:
    """Cancel a queued or running job (Client.cancel); 409 if it has ended."""
    tenant = caller.tenant_of_job(client, job_id)
    cancel_or_409(client, job_id, tenant)
    return _json(panels.timeline(client.engine, Scope(tenant, caller.key.admin), job_id))


@router.post("/api/jobs/{job_id}/retry")
def retry_job(job_id: str, caller: ActorDep, client: ClientDep) -> JSONResponse:
    """Run a failed job again (Client.retry); 409 if it is not failed."""
    tenant = caller.tenant_of_job(client, job_id)
    client.retry(job_id, tenant=tenant)
    return _json(panels.timeline(client.engine, Scope(tenant, caller.key.admin), job_id))


@router.post("/api/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, caller: ActorDep, client: ClientDep) -> JSONResponse:
    """Cancel an open batch (llmos.batches: its queued jobs cancelled); 409 if it is final."""
    tenant = panels.batch_tenant(client.engine, batch_id) if caller.key.admin else caller.key.tenant
    if tenant is None:
        raise BatchNotFoundError(f"no batch with id {batch_id!r}")
    info = batch_core.cancel_batch(client, batch_id, tenant=tenant)
    return _json({"id": info.id, "status": info.status, "tenant": info.tenant})
