"""The SDK against a real `crypto-client api` process on a real PostgreSQL database."""

from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.engine import create_engine
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from tests.conftest import postgresql_url
from tests.support.databases import empty_database
from tests.support.services import ApiServer

__all__ = ["postgresql_url"]  # the service's session database, shared with its tests

BASE_TS = 1_767_225_600  # 2026-01-01 00:00 UTC
TICKERS = "btc_usd,eth_usd"


def api_env(database_url: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "TICKERS": TICKERS, "LOG_FORMAT": "json"}


@pytest.fixture
async def engine(postgresql_url: str) -> AsyncIterator[AsyncEngine]:
    """A writable engine on the emptied session database; emptied again after the test."""
    await empty_database(postgresql_url)
    engine = create_engine(postgresql_url)
    yield engine
    await engine.dispose()
    await empty_database(postgresql_url)


@pytest.fixture
def api(postgresql_url: str, engine: AsyncEngine, tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer.command("api", api_env(postgresql_url), tmp_path) as server:
        yield server


async def store(engine: AsyncEngine, prices: Sequence[tuple[str, Decimal | str, int]]) -> None:
    """Commit these (ticker, price, ts) rows as polled prices of the slot at ts, every one new."""
    rows = [NewPrice(ticker, Decimal(price), ts, ts, "poll") for ticker, price, ts in prices]
    async with write_transaction(engine) as writer:
        assert len(await writer.insert_many(rows)) == len(rows)
