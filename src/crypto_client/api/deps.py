"""Dependencies of the routes: the read-only database access and the query checks."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.config import Settings
from crypto_client.db.repository import PriceReader


def get_read_engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.read_engine
    return engine


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_reader(engine: Annotated[AsyncEngine, Depends(get_read_engine)]) -> AsyncIterator[PriceReader]:
    async with engine.connect() as connection:
        yield PriceReader(connection)


def reject_repeated_parameters(request: Request) -> None:
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


ReaderDep = Annotated[PriceReader, Depends(get_reader)]
ReadEngineDep = Annotated[AsyncEngine, Depends(get_read_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
