"""llmos.monitoring.flower's credentials: parsing, static pairs, admin keys (SQLite), refusal without any."""

from __future__ import annotations

import base64

import pytest

from llmos import manager
from llmos.db import get_engine
from llmos.errors import ConfigError
from llmos.monitoring.flower import Credentials, broker_url_for_flower, build, parse_basic_auth
from llmos.settings import Settings


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_parse_basic_auth_splits_and_checks():
    assert parse_basic_auth(["a:1,b:2", "c:x:y"]) == ["a:1", "b:2", "c:x:y"]
    for bad in (["nocolon"], [":pw"], ["user:"]):
        with pytest.raises(ConfigError):
            parse_basic_auth(bad)


def test_static_pairs():
    creds = Credentials(["ops:pw", "ro:other"])
    assert creds.user(basic("ops", "pw")) == "ops"
    assert creds.user(basic("ro", "other")) == "ro"
    for header in (basic("ops", "other"), basic("admin", "pw"), "", "Bearer ops:pw", "Basic !!!",
                   "Basic " + base64.b64encode(b"ops").decode()):
        assert creds.user(header) is None, header


def test_admin_keys_only_admin_user_and_live_admin_keys(sqlite_settings):
    engine = get_engine(sqlite_settings.db_url)
    row, admin_key = manager.create_api_key(engine, tenant="ops", admin=True)
    _, tenant_key = manager.create_api_key(engine, tenant="acme")
    creds = Credentials([], engine)
    assert creds.user(basic("admin", admin_key)) == f"admin ({row.prefix})"
    assert creds.user(basic("admin", tenant_key)) is None
    assert creds.user(basic("root", admin_key)) is None
    assert Credentials([]).user(basic("admin", admin_key)) is None  # admin keys off
    manager.revoke_api_key(engine, row.prefix)
    assert creds.user(basic("admin", admin_key)) is None


def test_no_credentials_no_flower(tmp_path):
    s = Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigError, match="Flower needs credentials"):
        build(s, port=0, address="127.0.0.1", basic_auth=[], admin_keys=False)


def test_broker_url_in_flowers_schemes(tmp_path):
    assert broker_url_for_flower(Settings(home=tmp_path, redis_url="redis://h:6379/6")) == "redis://h:6379/6"
    assert broker_url_for_flower(Settings(home=tmp_path)).startswith("redis+socket:///")
