"""Engines: the connection settings each backend needs (URLs are normalized by
`setting_values.async_url`), and what counts as the database being out of reach."""

import asyncio
import socket
from typing import Any
from urllib.parse import quote

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from crypto_client.setting_values import async_url

_CONNECT_TIMEOUT_SECONDS = 5.0


def describe_database(url: str) -> str:
    """The URL as a person reads it, never with its password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database}"
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=True)


async def database_problem(url: str) -> str | None:
    """None when the database answers, else one sentence saying what is wrong."""
    target = make_url(url)
    engine = create_engine(url, pool_size=1)
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS + 1):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        return None
    except Exception as exc:
        return _explain(exc, target)
    finally:
        await engine.dispose()


def _explain(error: BaseException, url: URL) -> str:
    where = f"{url.host}:{url.port or 5432}"
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {type(each).__name__ for each in chain}
    if any(isinstance(each, socket.gaierror) for each in chain):
        return f"unknown host {url.host!r}"
    if any(isinstance(each, ConnectionRefusedError) for each in chain):
        return f"nothing accepts connections at {where} (is PostgreSQL running there?)"
    if "InvalidCatalogNameError" in names:
        return f"database {url.database!r} does not exist at {where} (create it, or fix the name)"
    if names & {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return f"{where} refused user {url.username!r}: wrong password or no such role"
    if any(isinstance(each, TimeoutError) for each in chain):
        return f"no answer from {where} within {_CONNECT_TIMEOUT_SECONDS:g} s"
    if url.get_backend_name() == "sqlite":
        return f"cannot open {url.database}: {str(error).splitlines()[0]} (does its directory exist?)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 10,
    read_only: bool = False,
    statement_timeout_seconds: float | None = None,
) -> AsyncEngine:
    """An engine for one process; dispose of it when the process stops.

    `read_only` engines serve the API: every statement runs on its own (autocommit, so no
    BEGIN/ROLLBACK round trips) and cannot write, because PostgreSQL sessions start with
    `default_transaction_read_only` and SQLite files are opened `mode=ro`. They skip the
    pre-ping round trip too: a connection broken by a database restart fails its request,
    which invalidates the pool, and the next request connects afresh. Their pool never
    opens connections beyond `pool_size` (no overflow to open and close under bursts).
    PostgreSQL ends a statement running longer than `statement_timeout_seconds`.
    """
    target = async_url(url)
    options: dict[str, Any] = {"pool_pre_ping": not read_only}
    if read_only:
        options["isolation_level"] = "AUTOCOMMIT"
    if target.get_backend_name() == "postgresql":
        server_settings = {"application_name": "crypto-client-api" if read_only else "crypto-client-ingest"}
        if read_only:
            server_settings["default_transaction_read_only"] = "on"
        if statement_timeout_seconds:
            server_settings["statement_timeout"] = str(round(statement_timeout_seconds * 1000))
        options.update(
            pool_size=pool_size,
            max_overflow=0 if read_only else pool_size,
            pool_timeout=_CONNECT_TIMEOUT_SECONDS,
            connect_args={"timeout": _CONNECT_TIMEOUT_SECONDS, "server_settings": server_settings},
        )
    else:
        path = target.database
        if path and path != ":memory:" and read_only:
            # A file: URI: the path's own '#', '?', '%' and spaces must be escaped in it.
            target = target.set(query={**target.query, "mode": "ro", "uri": "true"})
            target = target.set(database=f"file:{quote(path)}")
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


class QueryTimeoutError(Exception):
    """A query ran longer than the API allows (`API_STATEMENT_TIMEOUT_SECONDS`)."""


_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE for a statement ended by statement_timeout


def is_query_timeout(error: BaseException) -> bool:
    if isinstance(error, QueryTimeoutError):
        return True
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) == _QUERY_CANCELED


def is_lock_timeout(error: BaseException) -> bool:
    """A statement gave up waiting for a lock (`lock_timeout`)."""
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE


def is_database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached now (worth waiting for)."""
    if isinstance(error, DatabaseUnavailableError | OSError | TimeoutError):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated or isinstance(error, OperationalError | InterfaceError):
            return True
        # asyncpg's errors arrive as plain DBAPIError: a server starting up, shutting down or
        # cut off says so only in its SQLSTATE.
        sqlstate = getattr(error.orig, "sqlstate", None)
        return isinstance(sqlstate, str) and (
            sqlstate.startswith(_CONNECTION_EXCEPTION) or sqlstate in _SERVER_GOING_AWAY
        )
    return False


_CONNECTION_EXCEPTION = "08"  # the SQLSTATE class of connection exceptions
# admin_shutdown, crash_shutdown, cannot_connect_now ("the database system is starting up"),
# too_many_connections
_SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03", "53300"})
