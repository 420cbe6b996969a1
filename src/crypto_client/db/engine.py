"""Engines: URL normalization, the connection settings each backend needs, and what counts
as the database being out of reach."""

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

# The async driver this service uses for each backend, whatever driver a URL names.
_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
_CONNECT_TIMEOUT_SECONDS = 5.0


def async_url(url: str | URL) -> URL:
    """`url` with this service's async driver: `postgres://` and `postgresql+psycopg://` alike."""
    parsed = make_url(str(url).replace("postgres://", "postgresql://", 1)) if isinstance(url, str) else url
    backend = parsed.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported database {backend!r}: use PostgreSQL or SQLite")
    return parsed.set(drivername=_ASYNC_DRIVERS[backend])


def create_engine(url: str | URL, *, pool_size: int = 10, read_only: bool = False) -> AsyncEngine:
    """An engine for one process; dispose of it when the process stops.

    `read_only` engines serve the API: every statement runs on its own (autocommit, so no
    BEGIN/ROLLBACK round trips) and cannot write, because PostgreSQL sessions start with
    `default_transaction_read_only` and SQLite files are opened `mode=ro`. They skip the
    pre-ping round trip too: a connection broken by a database restart fails its request,
    which invalidates the pool, and the next request connects afresh.
    """
    target = async_url(url)
    options: dict[str, Any] = {"pool_pre_ping": not read_only}
    if read_only:
        options["isolation_level"] = "AUTOCOMMIT"
    if target.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {"timeout": _CONNECT_TIMEOUT_SECONDS}
        if read_only:
            connect_args["server_settings"] = {"default_transaction_read_only": "on"}
        options.update(
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=_CONNECT_TIMEOUT_SECONDS,
            connect_args=connect_args,
        )
    else:
        if target.database and target.database != ":memory:" and read_only:
            target = target.set(query={**target.query, "mode": "ro", "uri": "true"})
            target = target.set(database=f"file:{target.database}")
        options["connect_args"] = {"timeout": 30}

    engine = create_async_engine(target, **options)
    if target.get_backend_name() == "sqlite":

        def configure_sqlite(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            # WAL lets the API read while the scheduler writes; the busy timeout makes a
            # writer wait for another one instead of failing at once.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout = 30000")
            if not read_only:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.close()

        event.listen(engine.sync_engine, "connect", configure_sqlite)
    return engine


class DatabaseUnavailableError(Exception):
    """The database cannot be reached now (raised where a raw socket error is caught)."""


def is_database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached now (worth waiting for)."""
    if isinstance(error, DatabaseUnavailableError | OSError | TimeoutError):
        return True
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)
    return False
