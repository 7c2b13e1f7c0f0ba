"""The API's own settings (LLMOS_API_*): quotas, limits and the rate-limit storage.

Per-tenant quota overrides and per-model shedding limits come from the tables `[tenants.NAME]`
and `[shedding.max_queue]` of the file the model registry reads (LLMOS_CONFIG or ./llmos.toml).
"""

from __future__ import annotations

import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import limits
import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt, StrictStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmos.errors import ConfigError
from llmos.settings import Settings, config_path

WAIT_MAX_S = 60.0
"""Longest one long-poll call (`GET /v1/jobs/{id}/wait`) blocks."""

TENANT_KEYS = ("rate_limit", "max_queued_jobs", "max_body_bytes")
"""The quotas a [tenants.NAME] table may override."""


class TenantQuota(BaseModel):
    """One [tenants.NAME] table of llmos.toml: the quotas it sets (None: the global setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_limit: StrictStr | None = None
    max_queued_jobs: StrictInt | None = Field(default=None, gt=0)
    max_body_bytes: StrictInt | None = Field(default=None, gt=0)

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                limits.parse(value)
            except ValueError:
                raise ValueError("not a rate limit such as \"200/second\" or \"1000/minute\"") from None
        return value


@dataclass(frozen=True)
class Quota:
    """The quotas in force for one tenant, and which of them its [tenants.NAME] table set."""

    tenant: str
    rate_limit: str
    max_queued_jobs: int
    max_body_bytes: int
    overridden: frozenset[str]

    def setting(self, name: str) -> str:
        """Where quota `name` of this tenant is set, for messages."""
        return (f"[tenants.{self.tenant}] {name} in llmos.toml" if name in self.overridden
                else f"LLMOS_API_{name.upper()}")


class ApiSettings(BaseSettings):
    """Quotas and limits of the API; `tenants` and `model_max_queue` come from llmos.toml."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_API_", extra="ignore", frozen=True)

    max_body_bytes: int = Field(default=32 * 2**20, gt=0,
                                description="Largest request body; a larger one is answered 413.")
    max_queued_jobs: int = Field(default=100_000, gt=0,
                                 description="Most queued jobs a tenant may have; a submit over it is answered 429.")
    rate_limit: str = Field(default="100/second",
                            description="Requests per tenant, shared by every API process (limits' notation).")
    rate_limit_storage: str | None = Field(
        default=None, description="limits storage URI (e.g. memory://); default: the broker's Redis.")
    queue_retry_after_s: int = Field(default=5, gt=0,
                                     description="Retry-After of a 429 for the queued-jobs quota.")
    max_model_queue: int = Field(
        default=100_000, gt=0, description="Messages waiting in a model's queue past which new low and batch "
        "work is shed with 429 (normal at 2×, high at 4×, critical never); per model: [shedding.max_queue].")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `llmos up` serves the API on.")
    tenants: dict[str, TenantQuota] = Field(
        default_factory=dict, description="Per-tenant overrides ([tenants.NAME] in llmos.toml).")
    model_max_queue: dict[str, int] = Field(
        default_factory=dict, description="Per-model queue maximum ([shedding.max_queue] in llmos.toml).")
    events_poll_s: float = Field(default=0.5, gt=0, description="How often an event stream reads its job's status.")
    events_keepalive_s: float = Field(default=15.0, gt=0, description="A comment line this often keeps idle streams open.")
    openai_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest POST /v1/chat/completions, /v1/completions and /v1/embeddings "
        "wait for their jobs (also each job's deadline to start and its run timeout); then the jobs are "
        "cancelled and the answer is 504.")
    openai_waiters: int = Field(default=256, gt=0, description="Threads of one API process that wait for the "
                                "jobs of OpenAI-compatible requests (requests waiting at once, beyond: queued).")
    webhook_allow_private: bool = Field(
        default=False, description="Accept webhook URLs on loopback, private, link-local and reserved addresses.")
    webhook_deliver: bool = Field(default=True, description="Run the webhook deliverer in this API process.")
    webhook_poll_s: float = Field(default=1.0, gt=0, description="How often the deliverer looks for due webhooks.")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of each webhook POST (connect, send, read).")
    webhook_concurrency: int = Field(default=8, gt=0, description="Webhook POSTs one API process sends at once.")
    webhook_backoff_base_s: float = Field(
        default=2.0, gt=0, description="Wait before a failed webhook's first retry; doubled each retry.")
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0, description="Longest wait between webhook retries.")
    webhook_give_up_after_s: float = Field(
        default=86_400.0, gt=0, description="A webhook failing this long after its first attempt is given up.")
    metrics_token: SecretStr | None = Field(
        default=None, min_length=16, description="A bearer token that may scrape GET /metrics (besides admin keys); "
        "unset: admin keys only. At least 16 characters.")
    dashboard_secret: SecretStr | None = Field(
        default=None, description="Signs the dashboard's session cookies (at least 32 characters, "
        "the same on every API process; e.g. `openssl rand -hex 32`). Unset: the dashboard accepts no login "
        "(`llmos up` makes one under LLMOS_HOME). It is never stored in the database, so a copy of the "
        "database cannot forge a session; changing it ends every session.")
    dashboard_origins: str = Field(
        default="", description="Origins (scheme://host[:port], comma-separated) the dashboard's POSTs may come "
        "from besides the one the Host header names: the public origin behind a proxy that rewrites Host.")
    dashboard_session_s: int = Field(default=8 * 3600, gt=0, le=30 * 86_400,
                                     description="How long a dashboard login lasts (the cookie's Max-Age).")
    dashboard_refresh_s: float = Field(default=5.0, ge=1.0, description="How often the dashboard refreshes itself.")


    @field_validator("metrics_token", "dashboard_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # `NAME=` in an env file (deploy/env.example) leaves it unset

    @field_validator("dashboard_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`), "
                             f"got {len(value.get_secret_value())}")
        return value

    @field_validator("dashboard_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in allowed_origins(value):
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query \
                    or parts.fragment or "@" in parts.netloc:
                raise ValueError(f"{origin!r} is not an origin such as https://llmos.example.com "
                                 "(scheme and host, an optional port, no path)")
        return value

    @property
    def dashboard_origin_set(self) -> frozenset[str]:
        """LLMOS_API_DASHBOARD_ORIGINS as a set (no trailing slash, lower case)."""
        return frozenset(allowed_origins(self.dashboard_origins))

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        limits.parse(value)  # ValueError for a malformed limit
        return value

    def quota(self, tenant: str) -> "Quota":
        """`tenant`'s quotas: its [tenants.NAME] overrides, else the global settings."""
        own = self.tenants.get(tenant)
        given = own.model_dump(exclude_none=True) if own is not None else {}
        return Quota(tenant=tenant, overridden=frozenset(given),
                     **{name: given.get(name, getattr(self, name)) for name in TENANT_KEYS})

    def max_queue(self, model: str) -> int:
        """The shedding maximum of `model`'s queue: [shedding.max_queue], else LLMOS_API_MAX_MODEL_QUEUE."""
        return self.model_max_queue.get(model, self.max_model_queue)

    def max_queue_setting(self, model: str) -> str:
        """Where `model`'s shedding maximum is set, for messages."""
        return (f"[shedding.max_queue] {model} in llmos.toml" if model in self.model_max_queue
                else "LLMOS_API_MAX_MODEL_QUEUE")


def allowed_origins(value: str) -> list[str]:
    """The origins of a comma-separated list, lower case, without a trailing slash."""
    return [o.strip().rstrip("/").lower() for o in value.split(",") if o.strip()]


def get_api_settings(settings: Settings | None = None) -> ApiSettings:
    """Fresh API settings: the environment's, with llmos.toml's [tenants] and [shedding] tables.

    ConfigError (naming the file and the key) for a table or value the API cannot use, so a
    bad file stops the API at start rather than at some tenant's request.
    """
    try:
        api = ApiSettings()
    except pydantic.ValidationError as exc:  # a bad LLMOS_API_* variable: named, not a traceback
        err = exc.errors()[0]
        name = f"LLMOS_API_{str(err['loc'][0]).upper()}" if err["loc"] else "an LLMOS_API_ setting"
        message = " ".join(str(err["msg"]).split()).removeprefix("Value error, ")
        raise ConfigError(f"{name} is invalid: {message}") from None
    settings = settings or Settings()
    path = config_path(settings)
    if path is None:
        return api
    tenants, max_queue = read_api_config(path, api, settings)
    return api.model_copy(update={"tenants": tenants, "model_max_queue": max_queue})


SHEDDING_KEYS = ("max_queue",)
"""The keys a [shedding] table may have."""


def read_api_config(path: Path, api: ApiSettings,
                    settings: Settings) -> tuple[dict[str, TenantQuota], dict[str, int]]:
    """([tenants.NAME] overrides, [shedding.max_queue] per model) of `path`, checked."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    tenants: dict[str, TenantQuota] = {}
    for name, entry in _table(path, data, "tenants").items():
        where = f"[tenants.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where} must be a table of quotas ({', '.join(TENANT_KEYS)})")
        _known_keys(path, where, entry, TENANT_KEYS)
        try:
            quota = TenantQuota(**entry)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{path}: {where} {_first_error(exc, entry)}") from None
        if quota.max_body_bytes is not None and quota.max_body_bytes > api.max_body_bytes:
            raise ConfigError(f"{path}: {where} max_body_bytes = {quota.max_body_bytes} is above the "
                              f"global cap LLMOS_API_MAX_BODY_BYTES ({api.max_body_bytes}): a tenant's body "
                              "limit can only lower it (raise LLMOS_API_MAX_BODY_BYTES for everyone instead)")
        tenants[name] = quota
    shedding = _table(path, data, "shedding")
    _known_keys(path, "[shedding]", shedding, SHEDDING_KEYS)
    max_queue = _table(path, shedding, "max_queue", "shedding.max_queue")
    if max_queue:
        from llmos.registry import Registry

        known = Registry.load(settings).names()
        for model, value in max_queue.items():
            if model not in known:
                raise ConfigError(f"{path}: [shedding.max_queue] names unknown model {model!r}; "
                                  f"known models: {', '.join(known)}")
            if type(value) is not int or value < 1:
                raise ConfigError(f"{path}: [shedding.max_queue] {model} = {value!r} is invalid: "
                                  "it must be a whole number of jobs, at least 1")
    return tenants, dict(max_queue)


def _table(path: Path, data: dict[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {name or key} must be a table ([{name or key}]), got {value!r}")
    return value


def _known_keys(path: Path, where: str, entry: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ConfigError(f"{path}: {where} has unknown key {unknown[0]!r}; "
                          f"known keys: {', '.join(sorted(known))}")


def _first_error(exc: pydantic.ValidationError, entry: dict[str, Any]) -> str:
    err = exc.errors()[0]
    key = str(err["loc"][0]) if err["loc"] else "?"
    message = " ".join(str(err["msg"]).split()).removeprefix("Value error, ")
    return f"{key} = {entry.get(key)!r} is invalid: {message}"
