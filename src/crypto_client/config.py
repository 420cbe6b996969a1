"""The service's configuration: one validated model, read from the environment and `.env`."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from crypto_client.domain import DAY_SECONDS, parse_ticker
from crypto_client.setting_values import (
    check_broker_url,
    check_database_url,
    parse_networks,
    parse_rate_limit,
)

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///crypto-client.db"
# `serve --simulate`'s default: made-up prices never go into the real default file.
DEMO_SQLITE_URL = "sqlite+aiosqlite:///crypto-client-demo.db"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _deribit(name: str) -> AliasChoices:
    # Settings that only concern Deribit are named DERIBIT_*; the seed's HTTP_* names still work.
    return AliasChoices(f"deribit_{name}", f"http_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True, populate_by_name=True)

    tickers: Annotated[tuple[str, ...], NoDecode] = ("btc_usd", "eth_usd")

    deribit_rpc_url: str = "https://www.deribit.com/api/v2"
    deribit_timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, validation_alias=_deribit("timeout_seconds")
    )
    deribit_max_retries: int = Field(default=3, ge=0, le=20, validation_alias=_deribit("max_retries"))
    deribit_retry_backoff_seconds: float = Field(
        default=0.5, gt=0, le=60, validation_alias=_deribit("retry_backoff_seconds")
    )
    deribit_max_concurrency: int = Field(
        default=20, ge=1, le=32, validation_alias=_deribit("max_concurrency")
    )
    # Deribit refuses a 33rd connection per IP: the budget of every process sharing the broker.
    deribit_max_connections: int = Field(default=24, ge=1, le=32)

    # Deribit's trade history since the platform started (the main host keeps one day).
    deribit_history_url: str = "https://history.deribit.com/api/v2"
    # Trade back-fill and settlement requests started per second (Deribit's public budget is
    # about 20 a second per IP, shared by every process of the host).
    deribit_history_requests_per_second: float = Field(default=10.0, gt=0, le=20)

    deribit_ws_url: str = "wss://www.deribit.com/ws/api/v2"
    stream_enabled: bool = False
    stream_stall_seconds: float = Field(default=30.0, ge=1, le=3600)
    # Write into a database whose prices came from another origin (see `crypto_client.origin`).
    allow_origin_change: bool = False

    ingest_interval_seconds: int = Field(default=60, ge=1, le=DAY_SECONDS)
    ingest_max_write_delay_seconds: int = Field(default=300, ge=0, le=86400)

    backfill_interval_seconds: int = Field(default=300, ge=0, le=86400)
    # Unset: keep everything.
    retention_days: int | None = Field(default=None, ge=1, le=36500)
    # Unset: three ingestion intervals.
    stale_after_seconds: int | None = Field(default=None, ge=1, le=86400 * 30)

    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Where the worker, beat and stream consumer serve Prometheus metrics; 0: not served.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    database_url: SecretStr | None = None
    postgres_db: str = "crypto"
    postgres_user: str = "app"
    postgres_password: SecretStr = SecretStr("")
    postgres_host: str | None = None
    postgres_port: int = Field(default=5432, ge=1, le=65535)
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # API processes read here (a replica) when set; writers always use DATABASE_URL.
    database_read_url: SecretStr | None = None
    # /readyz fails when the replica it reads is further behind than this.
    database_read_max_lag_seconds: float = Field(default=30.0, gt=0, le=86400)

    celery_broker_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    celery_result_backend: SecretStr | None = None
    # Unset: derived from the interval (see `celery_visibility_timeout`).
    celery_visibility_timeout_seconds: int | None = Field(default=None, ge=2, le=86400)
    # How long worker, beat and stream wait at start for their database and broker.
    startup_wait_seconds: float = Field(default=300.0, ge=0, le=86400)

    api_latest_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    api_statement_timeout_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Idle keep-alive connections, and request headers slower than this, are closed.
    api_keepalive_timeout_seconds: float = Field(default=15.0, ge=1, le=3600)
    # Per API process: more concurrent clients get a 503 with Retry-After.
    api_max_streams: int = Field(default=1000, ge=1, le=100_000)
    api_max_exports: int = Field(default=4, ge=1, le=1000)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # Exposure (docs/notes/exposure.md): keys, quotas, the client address, /metrics.
    api_keys_required: bool = False
    api_dashboard_open: bool = True
    # The `limits` syntax, e.g. 100/second;10000/hour; unset: no quota but a key's own.
    api_rate_limit: str | None = None
    # Unset: the Celery broker's Redis for `crypto-client api`, memory for `serve`.
    api_rate_limit_storage_url: SecretStr | None = None
    api_key_max_streams: int = Field(default=8, ge=1, le=10_000)
    api_key_max_exports: int = Field(default=2, ge=1, le=10_000)
    forwarded_allow_ips: Annotated[tuple[str, ...], NoDecode] = ()
    metrics_token: SecretStr | None = None

    @property
    def shared_budget_url(self) -> str | None:
        """The Redis that holds the host's Deribit connection budget: the broker, when one is
        configured (set in the environment or .env) and is Redis; else none (a per-process cap)."""
        if "celery_broker_url" not in self.model_fields_set:
            return None
        url = self.celery_broker_url.get_secret_value()
        return url if url.startswith(("redis://", "rediss://", "unix://")) else None

    @property
    def stale_after(self) -> int:
        """How old a ticker's newest price may be before `/readyz` calls it stale."""
        return self.stale_after_seconds or 3 * self.ingest_interval_seconds

    @property
    def celery_visibility_timeout(self) -> int:
        """How long a dead worker's message waits before redelivery: short enough that a
        slot of 10 s or more is recovered within itself, at most 30 s."""
        if self.celery_visibility_timeout_seconds is not None:
            return self.celery_visibility_timeout_seconds
        return min(30, max(2, self.ingest_interval_seconds * 3 // 10))

    @field_validator(
        "database_url",
        "database_read_url",
        "celery_result_backend",
        "postgres_host",
        "celery_visibility_timeout_seconds",
        "stale_after_seconds",
        "retention_days",
        "api_rate_limit",
        "api_rate_limit_storage_url",
        "metrics_token",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `VAR=` in a .env file means "not set", not "the empty URL".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_database_url(value.get_secret_value())
        return value

    @field_validator("database_read_url")
    @classmethod
    def _check_database_read_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            url = value.get_secret_value()
            check_database_url(url)
            if not url.startswith(("postgresql", "postgres:")):
                raise ValueError("must be a PostgreSQL URL (a streaming replica of DATABASE_URL)")
        return value

    @field_validator("celery_broker_url")
    @classmethod
    def _check_broker_url(cls, value: SecretStr) -> SecretStr:
        check_broker_url(value.get_secret_value())
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()
        return value

    @field_validator("tickers", mode="before")
    @classmethod
    def _split_tickers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            tickers = tuple(dict.fromkeys(parse_ticker(str(item)) for item in value))
            if not tickers:
                raise ValueError("at least one ticker is required")
            return tickers
        return value

    @field_validator("ingest_interval_seconds")
    @classmethod
    def _check_interval_divides_a_day(cls, value: int) -> int:
        # Slots must tile every UTC day (and so every month partition): a slot that crossed
        # midnight at a month's end would belong to two partitions and could get two rows.
        if DAY_SECONDS % value:
            fitting = [n for n in (value - 1, value + 1) if n >= 1 and DAY_SECONDS % n == 0]
            hint = f" (e.g. {' or '.join(map(str, fitting))})" if fitting else ""
            raise ValueError(f"must divide a day (86400 s) exactly{hint}, got {value}")
        return value

    @field_validator("api_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    @field_validator("api_rate_limit_storage_url")
    @classmethod
    def _check_storage_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "memory://")
        ):
            raise ValueError("must be a redis://, rediss:// or memory:// URL")
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _check_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, tuple | list):
            parse_networks(value)
        return value

    def quota_storage_url(self, *, embedded: bool) -> str:
        """Where quotas are counted: `API_RATE_LIMIT_STORAGE_URL`, else this process's memory
        (the embedded service is one process) or the Celery broker's Redis (every `api`
        process shares it)."""
        if self.api_rate_limit_storage_url is not None:
            return self.api_rate_limit_storage_url.get_secret_value()
        broker = self.celery_broker_url.get_secret_value()
        if embedded or not broker.startswith(("redis://", "rediss://")):
            return "memory://"
        return broker

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("deribit_ws_url")
    @classmethod
    def _check_ws_url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("must be a ws:// or wss:// URL")
        return value

    @field_validator("deribit_rpc_url", "deribit_history_url")
    @classmethod
    def _check_rpc_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def database_read_url_value(self) -> str:
        """Where the API reads: `DATABASE_READ_URL`, else the writers' database."""
        if self.database_read_url is not None:
            return self.database_read_url.get_secret_value()
        return self.database_url_value

    @property
    def listen_url(self) -> str | None:
        """Where the API listens for stored rows: the writers' database (notifications are not
        replicated), or nowhere when only a replica is configured (then it polls)."""
        if self.database_read_url is not None and self.database_url is None:
            return None
        return self.database_url_value

    @property
    def database_url_value(self) -> str:
        """The SQLAlchemy URL: `DATABASE_URL`, else the `POSTGRES_*` parts, else SQLite."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if self.postgres_host:
            password = self.postgres_password.get_secret_value()
            credentials = quote(self.postgres_user, safe="")
            if password:
                credentials += ":" + quote(password, safe="")
            return (
                f"postgresql://{credentials}@{self.postgres_host}:{self.postgres_port}/"
                f"{quote(self.postgres_db, safe='')}"
            )
        return DEFAULT_SQLITE_URL


class SettingsError(Exception):
    """A configuration value is invalid; the message names the variable and the problem."""


def _where(name: str, env_file: Path) -> str:
    """The variable, as the user spelled it (an old alias too), and where it was set."""
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    names = (
        [choice for choice in alias.choices if isinstance(choice, str)]
        if isinstance(alias, AliasChoices)
        else [name]
    )
    environment = {key.lower() for key in os.environ}
    from_file = {key.lower() for key in dotenv_values(env_file)} if env_file.is_file() else set()
    for candidate in names:
        if candidate in environment:
            return candidate.upper()
        if candidate in from_file:
            return f"{candidate.upper()} (in {env_file})"
    return names[0].upper()


def setting_origin(settings: Settings, field: str) -> str:
    """The variable behind `field`, as the user spelled it, and where it was set."""
    return _where(field, Path(str(Settings.model_config.get("env_file") or ".env")))


def database_origin(settings: Settings, *, reading: bool = False) -> str:
    """Which setting chose the database (the API's, when `reading`), and from where: for
    start-up error messages."""
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    if reading and settings.database_read_url is not None:
        return _where("database_read_url", env_file)
    if settings.database_url is not None:
        return _where("database_url", env_file)
    if settings.postgres_host:
        return _where("postgres_host", env_file)
    return "the default (neither DATABASE_URL nor POSTGRES_HOST is set)"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
        problems = []
        for error in exc.errors():
            variable = _where(str(error["loc"][0]), env_file) if error["loc"] else "settings"
            problems.append(f"{variable}: {error['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded and validated once."""
    return load_settings()
