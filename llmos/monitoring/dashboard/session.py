"""The dashboard's login sessions: a signed, expiring cookie that names an API key, never holds it.

The cookie reads `<key id>.<expiry, Unix s>.<mac>`; mac = HMAC-SHA256 over "session|id|expiry"
keyed by the server's secret (LLMOS_API_DASHBOARD_SECRET, may be empty) joined with the key's
stored hash. So:
- the API key itself is never in the browser after login (a stolen cookie is worth one session
  until its expiry, not the key);
- every API process verifies every session without shared state (the key's hash is in the
  database), and revoking the key ends its sessions at once (the row is read per request);
- forging one needs the key's hash (the database) and, where the secret is set, the secret too.
The CSRF token is HMAC(same key, "csrf|" + cookie value): bound to the session, never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any

import sqlalchemy as sa

from llmos.db import api_keys
from llmos.manager import ApiKey

COOKIE = "llmos_dashboard"
CSRF_HEADER = "X-LLMOS-CSRF"


def _mac_key(secret: str, key_hash: str) -> bytes:
    return hashlib.sha256(f"llmos-dashboard|{secret}|{key_hash}".encode()).digest()


def _mac(secret: str, key_hash: str, text: str) -> str:
    return hmac.new(_mac_key(secret, key_hash), text.encode(), hashlib.sha256).hexdigest()


def key_hash(engine: sa.Engine, key_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(api_keys.c.hash).where(api_keys.c.id == key_id)).scalar()


def make(engine: sa.Engine, key: ApiKey, *, secret: str, max_age_s: int, now: float | None = None) -> str:
    """A new session cookie's value for `key`, valid `max_age_s` seconds."""
    expires = int((time.time() if now is None else now) + max_age_s)
    return f"{key.id}.{expires}.{_mac(secret, key_hash(engine, key.id) or '', f'session|{key.id}|{expires}')}"


def verify(engine: sa.Engine, value: Any, *, secret: str, now: float | None = None) -> tuple[ApiKey, str] | None:
    """(the live key, the session's CSRF token) of a cookie value, or None: malformed, expired,
    forged, or its key revoked or gone."""
    if not isinstance(value, str) or value.count(".") != 2 or len(value) > 200:
        return None
    key_id, expires, mac = value.split(".")
    try:
        key_id = str(uuid.UUID(key_id))
        expires_at = int(expires)
    except ValueError:
        return None
    if expires_at < (time.time() if now is None else now):
        return None
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(mac, _mac(secret, row.hash, f"session|{key_id}|{expires}")):
        return None
    return ApiKey.from_row(row._mapping), _mac(secret, row.hash, f"csrf|{value}")


def csrf_ok(expected: str, given: Any) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
