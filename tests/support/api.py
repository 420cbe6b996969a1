"""The API app in-process, started as a server starts it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from crypto_client.api.app import create_app
from crypto_client.config import Settings


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API app, started as a server would start it, behind an in-process HTTP client."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        yield client
