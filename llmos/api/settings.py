"""The API's own settings (LLMOS_API_*): quotas, limits and the rate-limit storage."""

from __future__ import annotations

import limits
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

WAIT_MAX_S = 60.0
"""Longest one long-poll call (`GET /v1/jobs/{id}/wait`) blocks."""


class ApiSettings(BaseSettings):
    """Quotas and limits of the API, the same for every tenant (per-tenant overrides come later)."""

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
    events_poll_s: float = Field(default=0.5, gt=0, description="How often an event stream reads its job's status.")
    events_keepalive_s: float = Field(default=15.0, gt=0, description="A comment line this often keeps idle streams open.")

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        limits.parse(value)  # ValueError for a malformed limit
        return value


def get_api_settings() -> ApiSettings:
    """Fresh API settings from the current environment."""
    return ApiSettings()
