"""Settings: one object read from the environment (LLMOS_*), with the embedded defaults.

With neither URL set, LLMOS runs embedded: a SQLite file and a Redis server on a unix socket,
both under LLMOS_HOME, so any process with the same LLMOS_HOME finds the same stack.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmos.constants import DEFAULT_MAX_JOB_SECONDS, EMBEDDED_DB_FILE, EMBEDDED_REDIS_SOCKET


class Settings(BaseSettings):
    """Everything LLMOS reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_", extra="ignore", frozen=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".llmos",
                       description="Folder for the embedded database, Redis socket and logs.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the task table.")
    redis_url: str | None = Field(default=None, description="Redis URL of the broker.")
    config: Path | None = Field(default=None, description="Model registry file (TOML).")
    url: str | None = Field(default=None, description="An LLMOS REST API; when set, the SDK's default client talks to it over HTTP.")
    api_key: SecretStr | None = Field(default=None, description="The API key the HTTP client sends (with LLMOS_URL).")
    models: str = Field(default="minilm", description="Comma-separated models `llmos up` starts a worker for.")
    max_job_seconds: int = Field(default=DEFAULT_MAX_JOB_SECONDS, gt=0,
                                 description="Longest a job may run; sets the visibility timeout.")
    log_level: str = Field(default="WARNING", description="Log level of LLMOS processes.")
    heartbeat_s: float = Field(default=5.0, gt=0, description="Worker heartbeat interval.")
    dead_after_s: float = Field(default=30.0, gt=0, description="A worker silent this long is dead.")
    resend_after_s: float = Field(default=60.0, gt=0, description="Re-send a queued job whose message is gone after this long.")
    lost_after_s: float = Field(default=4 * 3600.0, gt=0, description="Re-send any queued job unsent for this long.")
    reconcile_interval_s: float = Field(default=5.0, gt=0, description="Pause between reconciler passes.")
    timeout_grace_s: float = Field(default=10.0, ge=0, description="Extra time before the reconciler fails a job over its timeout.")
    retention_days: float = Field(default=0.0, ge=0, le=36_500, description="The reconciler deletes finished jobs and stopped workers' rows older than this, once a day, in small batches (0: keep everything; `llmos prune` does it by hand).")
    no_worker_grace_s: float = Field(default=5.0, ge=0, description="How long `execute` waits for a worker to serve a model none serves before raising NoWorkerError.")
    db_retry_s: float = Field(default=60.0, ge=0, description="How long workers retry the database before giving up a step.")
    retry_base_s: float = Field(default=1.0, gt=0, description="First backoff of a transient retry (doubles each attempt).")
    model_cpus: str | None = Field(default=None, description="A worker's model thread runs on these cores (e.g. `1` or `2-3`) and everything else of the worker on its other cores (workers/affinity.py; Linux).")
    deadline_admission: Literal["refuse", "warn", "off"] = Field(default="refuse", description="A submit whose deadline its measured ETA cannot meet: refused with DeadlineUnmeetableError (refuse), accepted with a DeadlineUnmeetableWarning (warn), or not checked (off); see docs/scheduling.md.")
    task_events: bool = Field(default=False, description="Workers send Celery task events, producers task-sent events (for Flower).")
    # llmos/scheduling: aging and tenant shares (docs/scheduling.md, "Aging and tenant shares")
    aging_s: float = Field(default=30.0, ge=0, description="A queued job goes up one priority step per this many seconds waited (the reconciler's pass does it; 0: no aging).")
    aging_ceiling: int = Field(default=9, ge=0, le=9, description="Aging promotes a job up to this priority, never beyond.")
    shares_window_s: float = Field(default=300.0, gt=0, description="Tenant shares ([shares] in llmos.toml) compare the compute seconds of this window.")
    openai_base_url: str | None = Field(default=None, description="Endpoint behind the built-in `gpt3` alias.")
    openai_model: str = Field(default="gpt-3.5-turbo-instruct", description="Remote model name for `gpt3`.")

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def embedded_db(self) -> bool:
        return not self.database_url

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def redis_socket(self) -> Path:
        return self.home_dir / EMBEDDED_REDIS_SOCKET

    @property
    def db_url(self) -> str:
        """The task table's URL (the embedded SQLite file when none is set)."""
        if self.database_url:
            return normalise_db_url(self.database_url)
        return f"sqlite:///{self.home_dir / EMBEDDED_DB_FILE}"

    @property
    def broker_url(self) -> str:
        """The Redis URL as redis-py reads it (unix:// for the embedded socket)."""
        return self.redis_url or f"unix://{self.redis_socket}"

    @property
    def kombu_url(self) -> str:
        """The same Redis, spelled the way kombu wants it, on our transport (`llmos.transport`)."""
        url = self.broker_url
        if url.startswith("unix://"):
            return "llmos-redis+socket://" + url[len("unix://"):]
        if url.startswith("redis://"):
            return "llmos-redis://" + url[len("redis://"):]
        return url  # rediss:// (TLS) stays on kombu's own transport

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def normalise_db_url(url: str) -> str:
    """Pick psycopg 3 for plain postgres URLs (SQLAlchemy would otherwise ask for psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (redis://...): strip userinfo by hand
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url


def config_path(settings: Settings) -> Path | None:
    """The file the registry and every `[section]` reader read: LLMOS_CONFIG (ConfigError if it
    is not a file), else ./llmos.toml if there is one, else None."""
    if settings.config:
        if not settings.config.is_file():
            from llmos.errors import ConfigError

            raise ConfigError(f"LLMOS_CONFIG points at {settings.config}, which is not a file")
        return settings.config
    path = Path.cwd() / "llmos.toml"
    return path if path.is_file() else None


def get_settings() -> Settings:
    """Fresh settings from the current environment."""
    return Settings()
