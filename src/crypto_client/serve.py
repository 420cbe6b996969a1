"""`crypto-client serve`: the one place that puts migration, the API and the embedded
scheduler together in one process."""

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from crypto_client.api.app import create_app
from crypto_client.config import Settings, load_settings
from crypto_client.db import migrations
from crypto_client.ingestion.embedded_scheduler import embedded_ingestion
from crypto_client.ingestion.stream_consumer import StreamHealth
from crypto_client.logging import setup_logging


def create_embedded_app(settings: Settings) -> FastAPI:
    """The API, on a database migrated at start-up, with ingestion running beside it (and
    the stream consumer's state in `app.state.stream_health`, for `/readyz`)."""
    stream_health = StreamHealth() if settings.stream_enabled else None

    @asynccontextmanager
    async def migrated_and_ingesting(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrations.upgrade, settings.database_url_value)
        async with embedded_ingestion(settings, stream_health):
            yield

    app = create_app(settings, lifespans=[migrated_and_ingesting], embedded=True)
    app.state.stream_health = stream_health
    return app


def create_embedded_app_from_environment() -> FastAPI:
    """The embedded service as `crypto-client serve` builds it (settings read anew)."""
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    return create_embedded_app(settings)


def start_simulator(port: int = 0) -> dict[str, str]:
    """Start the Deribit simulator on `port` (0: a free one) of 127.0.0.1, in a thread of this
    process (it stops with the process); returns the settings that point at it (JSON-RPC and
    WebSocket)."""
    import uvicorn

    from crypto_client.sim.app import create_sim_app
    from crypto_client.sim.simulator import Simulator

    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
    config = uvicorn.Config(
        create_sim_app(Simulator()),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="deribit-simulator", daemon=True).start()
    while not server.started:
        threading.Event().wait(0.02)
    return {
        "DERIBIT_RPC_URL": f"http://127.0.0.1:{port}/api/v2",
        "DERIBIT_WS_URL": f"ws://127.0.0.1:{port}/ws/api/v2",
    }
