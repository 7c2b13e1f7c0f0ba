"""The dashboard's login sessions: a signed, expiring cookie that names an API key, never holds it.

The cookie reads `<key id>.<expiry, Unix s>.<mac>`; mac = HMAC-SHA256 over "session|id|expiry"
keyed by HMAC(the server's secret, the key's stored hash). The secret is
LLMOS_API_DASHBOARD_SECRET (at least 32 characters), which is never in the database: without
it the dashboard accepts no login (`llmos up` makes one under LLMOS_HOME). So:
- the API key itself is never in the browser after login (a stolen cookie is worth one session
  until its expiry, not the key);
- every API process verifies every session without shared state (the key's hash is in the
  database, the secret in each process's environment), and revoking the key ends its sessions at
  once (the row is read per request, `manager.live_key_by_id`);
- forging one needs the secret: a copy of the database (a leaked dump) is not enough.
The CSRF token is HMAC(same key, "csrf|" + cookie value): bound to the session, never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import sqlalchemy as sa

from llmos import manager
from llmos.manager import ApiKey

COOKIE = "llmos_dashboard"
CSRF_HEADER = "X-LLMOS-CSRF"
MIN_SECRET_CHARS = 32
"""The shortest LLMOS_API_DASHBOARD_SECRET accepted."""


def _mac_key(secret: str, key_hash: str) -> bytes:
    if len(secret) < MIN_SECRET_CHARS:  # never sign with an empty or guessable secret
        raise ValueError(f"the dashboard's secret must be at least {MIN_SECRET_CHARS} characters")
    return hmac.new(secret.encode(), f"llmos-dashboard|{key_hash}".encode(), hashlib.sha256).digest()


def _mac(secret: str, key_hash: str, text: str) -> str:
    return hmac.new(_mac_key(secret, key_hash), text.encode(), hashlib.sha256).hexdigest()


def make(engine: sa.Engine, key: ApiKey, *, secret: str, max_age_s: int, now: float | None = None) -> str | None:
    """A new session cookie's value for `key`, valid `max_age_s` seconds; None if the key is
    revoked or gone meanwhile."""
    found = manager.live_key_by_id(engine, key.id)
    if found is None:
        return None
    expires = int((time.time() if now is None else now) + max_age_s)
    return f"{key.id}.{expires}.{_mac(secret, found[1], f'session|{key.id}|{expires}')}"


def verify(engine: sa.Engine, value: Any, *, secret: str, now: float | None = None) -> tuple[ApiKey, str] | None:
    """(the live key, the session's CSRF token) of a cookie value, or None: malformed, expired,
    forged, or its key revoked or gone."""
    if not isinstance(value, str) or value.count(".") != 2 or len(value) > 200:
        return None
    key_id, expires, mac = value.split(".")
    try:
        expires_at = int(expires)
    except ValueError:
        return None
    if expires_at < (time.time() if now is None else now):
        return None
    found = manager.live_key_by_id(engine, key_id)
    if found is None:
        return None
    key, key_hash = found
    if key.id != key_id or not hmac.compare_digest(mac, _mac(secret, key_hash, f"session|{key_id}|{expires}")):
        return None
    return key, _mac(secret, key_hash, f"csrf|{value}")


def csrf_ok(expected: str, given: Any) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
