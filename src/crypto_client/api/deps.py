"""Dependencies of the routes: the read-only database (`db.reader.ReadDatabase`), the cache,
the settings and the query checks."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from crypto_client.api.cache import LatestPriceCache
from crypto_client.config import Settings
from crypto_client.db.reader import ReadDatabase

# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool,
# which costs a thread hop per dependency per request.


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
