"""`crypto-client serve`: the one place that puts migration, the API and the embedded
scheduler together in one process."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from crypto_client.api.app import create_app
from crypto_client.config import Settings
from crypto_client.db import migrations
from crypto_client.ingestion.embedded_scheduler import embedded_ingestion


def create_embedded_app(settings: Settings) -> FastAPI:
    """The API, on a database migrated at start-up, with ingestion running beside it."""

    @asynccontextmanager
    async def migrated_and_ingesting(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrations.upgrade, settings.database_url_value)
        async with embedded_ingestion(settings):
            yield

    return create_app(settings, lifespans=[migrated_and_ingesting])
