"""Dependencies of the routes: the read-only database access and the query checks."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.cache import LatestPriceCache
from crypto_client.config import Settings
from crypto_client.db.engine import DatabaseUnavailableError, QueryTimeoutError
from crypto_client.db.repository import PriceReader

# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool,
# which costs a thread hop per dependency per request.


class ReadDatabase:
    """The API's read-only engine behind a first-come, first-served queue.

    Under more concurrent requests than pooled connections, SQLAlchemy's pool hands freed
    connections to whichever waiter wakes first, so a few requests can starve until the
    pool timeout; waiting on a (fair) asyncio semaphore first keeps every wait short.
    """

    def __init__(self, engine: AsyncEngine, connections: int, statement_timeout_seconds: float) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(connections)
        # PostgreSQL ends a longer statement itself; this also bounds SQLite and the wait for
        # a connection, a little later so that PostgreSQL's own message wins there.
        self._deadline = statement_timeout_seconds + 0.5

    @asynccontextmanager
    async def reader(self, *, queued: bool = True) -> AsyncIterator[PriceReader]:
        """A reader on one pooled connection; `queued=False` skips the queue (health checks
        ask whether the database answers, not how busy the API is)."""
        deadline = asyncio.timeout(self._deadline)
        try:
            async with deadline, AsyncExitStack() as stack:
                if queued:
                    await stack.enter_async_context(self._slots)
                try:
                    connection = await stack.enter_async_context(self.engine.connect())
                except (OSError, TimeoutError) as exc:
                    # Connecting fails with the driver's raw socket errors, which SQLAlchemy
                    # does not wrap; name them here so that only these become "unavailable".
                    raise DatabaseUnavailableError(f"cannot connect: {exc!r}") from exc
                yield PriceReader(connection)
        except TimeoutError:
            if deadline.expired():
                raise QueryTimeoutError(f"no answer within {self._deadline:g} s") from None
            raise


async def get_read_database(request: Request) -> ReadDatabase:
    database: ReadDatabase = request.app.state.read_database
    return database


async def get_latest_cache(request: Request) -> LatestPriceCache:
    cache: LatestPriceCache = request.app.state.latest_cache
    return cache


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def reject_repeated_parameters(request: Request) -> None:
    """A parameter given twice is ambiguous; say so rather than silently pick one."""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key in seen:
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", key),
                        "msg": "given more than once; pass it once",
                        "type": "repeated_parameter",
                    }
                ]
            )
        seen.add(key)


LatestCacheDep = Annotated[LatestPriceCache, Depends(get_latest_cache)]
ReadDatabaseDep = Annotated[ReadDatabase, Depends(get_read_database)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
