from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.app import create_app
from crypto_client.config import Settings
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
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


async def _clear(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM price_ticks"))
    finally:
        await engine.dispose()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A writable engine on an empty, migrated database; emptied again after the test."""
    await _clear(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
    await _clear(db_url)


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    server = SimServer(tmp_path_factory.mktemp("sim"))
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
