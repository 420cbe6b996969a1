"""Dependencies of the routes: the read-only database access and the query checks."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crypto_client.api.cache import LatestPriceCache
from crypto_client.config import Settings
from crypto_client.db.repository import PriceReader

# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool,
# which costs a thread hop per dependency per request.


class ReadDatabase:
    """The API's read-only engine behind a first-come, first-served queue.

    Under more concurrent requests than pooled connections, SQLAlchemy's pool hands freed
    connections to whichever waiter wakes first, so a few requests can starve until the
    pool timeout; waiting on a (fair) asyncio semaphore first keeps every wait short.
    """

    def __init__(self, engine: AsyncEngine, connections: int) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(connections)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self._slots, self.engine.connect() as connection:
            yield connection


async def get_read_database(request: Request) -> ReadDatabase:
    database: ReadDatabase = request.app.state.read_database
    return database


async def get_latest_cache(request: Request) -> LatestPriceCache:
    cache: LatestPriceCache = request.app.state.latest_cache
    return cache


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_reader(
    database: Annotated[ReadDatabase, Depends(get_read_database)],
) -> AsyncIterator[PriceReader]:
    async with database.connect() as connection:
        yield PriceReader(connection)


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
ReaderDep = Annotated[PriceReader, Depends(get_reader)]
ReadDatabaseDep = Annotated[ReadDatabase, Depends(get_read_database)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
