import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.app import create_app
from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.config import Settings
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.models import Base
from crypto_client.domain import current_slot
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import SimServer, ThrowawayPostgres, ThrowawayRedis


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


def make_settings(database_url: str, **overrides: object) -> Settings:
    """Settings from these values alone (model_validate reads no environment and no .env)."""
    return Settings.model_validate({"database_url": SecretStr(database_url), **overrides})


INGEST_TICKERS = ("btc_usd", "eth_usd", "sol_usdc")


async def roomy_slot(interval: int = 60, room: float = 10) -> int:
    """The current slot, or the next one when fewer than `room` seconds of this one are
    left: a tick started in it is never `late` merely because the test ran at a slot's end."""
    slot = current_slot(interval)
    if slot + interval - time.time() < room:
        await asyncio.sleep(slot + interval - time.time())
        slot = current_slot(interval)
    return slot


def ingestion_settings(sim: SimServer, db_url: str, **overrides: object) -> Settings:
    """Settings for ingesting INGEST_TICKERS from the simulator, with quick retries."""
    values: dict[str, object] = {
        "tickers": ",".join(INGEST_TICKERS),
        "deribit_rpc_url": sim.rpc_url,
        "deribit_timeout_seconds": 5,
        "deribit_max_retries": 2,
        "deribit_retry_backoff_seconds": 0.01,
        "ingest_interval_seconds": 60,
        **overrides,
    }
    return make_settings(db_url, **values)


@pytest.fixture
async def deribit(sim: SimServer) -> AsyncIterator[DeribitHttpClient]:
    """A client of the simulator, configured as `ingestion_settings`."""
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=2, backoff_seconds=0.01) as client:
        yield client


@pytest.fixture(scope="session")
async def postgresql_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "test.db"
    url = f"sqlite:///{path}"
    migrations.upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


async def empty_database(url: str) -> None:
    """Delete every row of the service's tables (the schema stays)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            for table in Base.metadata.sorted_tables:
                if connection.dialect.name == "sqlite" or not table.info.get("sqlite_only"):
                    await connection.execute(table.delete())
    finally:
        await engine.dispose()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A writable engine on an empty, migrated database; emptied again after the test."""
    await empty_database(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
    await empty_database(db_url)


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    # History points ten times closer than Deribit's (0.6 s apart for the 1h range), so that
    # tests with 1-second slots can repair every slot.
    server = SimServer(tmp_path_factory.mktemp("sim"), 0, "--chart-step-scale", "0.1")
    yield server
    server.stop()


@pytest.fixture
def sim(sim_server: SimServer) -> Iterator[SimServer]:
    """The session's simulator, with no faults and fresh counters."""
    sim_server.reset()
    yield sim_server
    sim_server.reset()


@pytest.fixture
def redis_server() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    yield server
    server.destroy()


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A private PostgreSQL cluster this test may stop and start."""
    server = ThrowawayPostgres()
    yield server
    server.destroy()
