"""Typed settings from ``GRANTKEEPER_*`` environment variables and an optional ``.env``.

Built once per process by :func:`get_settings` (never at import time), so tests construct
``Settings(...)`` directly and a worker reads its environment when its process starts.
Unknown ``GRANTKEEPER_*`` variables are rejected: a typo must fail loudly, not fall back to a
default silently.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config.redis_tls import parse_redis_tls

ENV_PREFIX = "GRANTKEEPER_"

# Where the embedded SQLite database lives when no GRANTKEEPER_DATABASE_URL is given.
DEFAULT_DATA_DIR = Path("var")


class Settings(BaseSettings):
    """Everything configurable. Every field maps to ``GRANTKEEPER_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
        # Validation errors must not echo the input: it holds database/redis URLs and keys.
        hide_input_in_errors=True,
    )

    env: Literal["development", "production"] = "development"

    # Storage. None means: an embedded SQLite file under data_dir (owner-only permissions).
    database_url: SecretStr | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    database_pool_size: int = Field(default=20, ge=1)

    # Redis: cache and locks; also the Celery broker unless broker_url is set.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    broker_url: SecretStr | None = None
    # Every grantkeeper key in Redis starts with this, so a compromise flush never touches
    # anything else in a shared Redis database.
    redis_key_prefix: str = "gk:"

    # Keyring: "kid:base64url-32-bytes,kid2:..." ; the primary encrypts, all decrypt.
    encryption_keys: SecretStr | None = None
    primary_key_id: str | None = None

    # Refresh timing (seconds).
    refresh_margin_seconds: int = Field(default=300, ge=1)
    scan_interval_seconds: float = Field(default=30.0, gt=0)
    # A token read through the library API must stay valid at least this long.
    min_token_validity_seconds: int = Field(default=30, ge=0)
    # Expiry is computed from when the request was sent minus this, to absorb clock skew.
    clock_skew_seconds: int = Field(default=30, ge=0)
    # Used when a provider omits expires_in: conservative on purpose.
    default_access_ttl_seconds: int = Field(default=600, ge=1)
    # Most connections one scan enqueues: at least (refreshes per second) x scan interval.
    # A million one-hour tokens need about 280/s, 8,400 per 30 s scan.
    scan_batch_limit: int = Field(default=20000, ge=1)
    # Connection ids per refresh task (the worker refreshes them one after another).
    refresh_batch_size: int = Field(default=20, ge=1, le=500)

    # HTTP to token endpoints.
    http_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    http_read_timeout_seconds: float = Field(default=15.0, gt=0)
    http_max_connections: int = Field(default=100, ge=1)
    http_max_response_bytes: int = Field(default=64 * 1024, ge=1024)

    # The refresh lock: must outlive the worst-case provider call (validated below).
    lock_ttl_seconds: float = Field(default=60.0, gt=0)
    lock_wait_seconds: float = Field(default=30.0, ge=0)
    # How the library API gets a token that is due: refresh it in this process under the lock
    # ("inline"), or ask the worker and wait up to lock_wait_seconds ("worker": for processes
    # whose database role may only read tokens, see `grantkeeper db roles`).
    api_refresh: Literal["inline", "worker"] = "inline"

    # Monthly rotation: force-refresh refresh tokens older than this, at this pace, on this
    # crontab ("minute hour day-of-month month day-of-week").
    rotation_max_age_days: int = Field(default=30, ge=1)
    rotation_schedule: str = "0 3 1 * *"
    rotation_rate_per_second: float = Field(default=5.0, gt=0)

    # Per-provider circuit breaker: this many transient failures within the window open it.
    breaker_threshold: int = Field(default=20, ge=1)
    breaker_window_seconds: int = Field(default=60, ge=1)
    breaker_cooldown_seconds: int = Field(default=30, ge=1)
    breaker_max_cooldown_seconds: int = Field(default=600, ge=1)
    # Transient failures back off from this base (doubling, jittered, capped at an hour).
    retry_base_seconds: float = Field(default=15.0, gt=0)

    # Optional webhook for events a person must act on (re-authorization needed, retries
    # exhausted, anomalies): JSON body, HMAC-SHA256 signature with the secret.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None

    # Reads: an optional process-local cache kept fresh by Redis client tracking, and how
    # often read tallies are written to the audit trail.
    local_cache: bool = False
    local_cache_max_entries: int = Field(default=100_000, ge=1)
    read_audit_interval_seconds: float = Field(default=5.0, gt=0)

    # Worker. The queue name keeps several deployments (or the demo) apart on one Redis.
    celery_queue: str = "grantkeeper"
    worker_concurrency: int = Field(default=32, ge=1)
    max_transient_retries: int = Field(default=8, ge=0)

    # Prometheus endpoints (grantkeeper/metrics.py). None: no endpoint, and the process keeps
    # no metrics. Loopback by default: /metrics has no authentication.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    beat_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"

    # Audit rows older than this are deleted by the daily retention task, and by nothing else.
    audit_retention_days: int = Field(default=400, ge=30)  # the database refuses fewer

    # Suspicious-activity detection (see grantkeeper/anomaly.py).
    anomaly_refresh_window_seconds: int = Field(default=3600, ge=60)
    anomaly_refresh_factor: float = Field(default=3.0, gt=1)
    anomaly_failure_window_seconds: int = Field(default=300, ge=10)
    anomaly_failure_connections: int = Field(default=10, ge=2)
    anomaly_new_reader: bool = False

    # Emergency override: start a production worker or beat although `grantkeeper check`
    # fails. Logged at CRITICAL on every start.
    unsafe_skip_startup_checks: bool = False

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_http_bodies: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, dotenv_settings

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_environment(cls, data: Any) -> Any:
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        # Case-insensitive, as pydantic-settings reads the environment: a lower-case
        # "grantkeeper_..." is read when known, so a lower-case typo must be refused too.
        unknown = sorted(
            k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
        )
        if unknown:
            raise ValueError(
                "unknown setting(s) "
                + "; ".join(_with_suggestion(k, known) for k in unknown)
                + " (every setting is listed in the README's Configuration table)"
            )
        return data

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rotation_schedule")
    @classmethod
    def _five_crontab_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(
                "rotation_schedule takes five crontab fields: minute hour day-of-month month"
                " day-of-week (e.g. '0 3 1 * *')"
            )
        return value

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix_is_specific(cls, value: str) -> str:
        if len(value) < 2:
            raise ValueError("redis_key_prefix must be at least 2 characters (e.g. 'gk:')")
        return value

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _redis_tls_parameters_are_known(cls, value: SecretStr | None) -> SecretStr | None:
        # rediss:// TLS options (ssl_cert_reqs, ssl_ca_certs...): parsed once here so a typo
        # stops start-up; see config/redis_tls.py. The message never contains the URL.
        if value is not None:
            parse_redis_tls(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _lock_outlives_provider_call(self) -> Settings:
        worst_call = self.http_connect_timeout_seconds + self.http_read_timeout_seconds
        if self.lock_ttl_seconds < 2 * worst_call:
            raise ValueError(
                f"lock_ttl_seconds ({self.lock_ttl_seconds}) must be at least twice the worst-case"
                f" provider call ({worst_call} s), or a second worker could refresh with a"
                " refresh token the first one is still using"
            )
        return self

    @property
    def effective_broker_url(self) -> str:
        return (self.broker_url or self.redis_url).get_secret_value()

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "grantkeeper.db"

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.sqlite_path}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def _with_suggestion(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
    return f"{name} (did you mean {close[0]}?)" if close else name


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad variable (``GRANTKEEPER_LOCK_TTL_SECONDS: ...``), never its
    value: the inputs may be secrets."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        names = [str(part) for part in error["loc"] if isinstance(part, str)]
        where = f"{ENV_PREFIX}{names[0].upper()}: " if names else ""
        message = error["msg"].removeprefix("Value error, ")
        problems.append(where + message)
    return "; ".join(problems)


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process (celery, the CLI) build the same settings:
    this process's environment without its ``GRANTKEEPER_*`` variables, plus every set field
    of ``settings`` (secrets in plain text: for a child's environment only), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    for name, value in settings.model_dump().items():
        if value is not None:
            plain = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"{ENV_PREFIX}{name.upper()}"] = str(plain)
    env.update(extra)
    return env


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
