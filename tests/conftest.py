import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.app import create_app
from crypto_client.config import Settings
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.repository import PriceReader, Tick
from tests.services import SimServer, ThrowawayPostgres, ThrowawayRedis, unavailable

PG_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_pg_database(admin_url: str = PG_ADMIN_URL, *, migrate: bool = True) -> str:
    """A new, empty (or migrated) database on the server of `admin_url`; returns its URL."""
    name = f"cc_test_{uuid.uuid4().hex[:12]}"
    try:
        connection = await asyncpg.connect(_plain_dsn(admin_url), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {admin_url} unreachable: {exc!r}")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    if migrate:
        await asyncio.to_thread(migrations.upgrade, url)
    return url


async def stored_ticks(engine: AsyncEngine, ticker: str, **bounds: int) -> list[Tick]:
    """Every stored row of `ticker` (within `bounds`), read back through the repository."""
    async with engine.connect() as connection:
        page = await PriceReader(connection).page_json(ticker, limit=100_000, **bounds)
    return [
        Tick(row["ticker"], row["price"], row["ts"]) for row in json.loads(page.json, parse_float=Decimal)
    ]


async def drop_pg_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    name = make_url(url).database
    connection = await asyncpg.connect(_plain_dsn(admin_url), timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


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
