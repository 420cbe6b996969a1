"""The API's queries are walks of the primary-key index on PostgreSQL (the production
database): no table scan and no sort, whatever the depth."""

import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.engine import create_engine
from crypto_client.db.pages import column_batch_statement, page_statement
from crypto_client.db.prices import PriceReads
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice

MAX = 2**62


@pytest.fixture
async def filled(postgresql_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgresql_url)
    ticks = [NewPrice(f"plan{n}_usd", Decimal("1.5"), ts * 60) for n in range(4) for ts in range(20_000)]
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(ticks)
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("ANALYZE price_ticks"))
    yield engine
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM price_ticks WHERE ticker LIKE 'plan%'"))
        await connection.execute(text("DELETE FROM price_candles_1h WHERE ticker LIKE 'plan%'"))
    await engine.dispose()


@pytest.mark.parametrize(
    ("statement", "parameters"),
    [
        (PriceReads.LATEST, {"not_after": MAX}),
        (page_statement("json", "postgresql"), {"lower": -MAX, "upper": MAX, "offset": 0}),
        (page_statement("json", "postgresql"), {"lower": 900_000, "upper": MAX, "offset": 0}),
        (page_statement("json", "postgresql"), {"lower": 600_000, "upper": 686_399, "offset": 0}),
        (PriceReads.AT, {"ts": 650_000}),
        (page_statement("csv", "postgresql"), {"lower": 900_000, "upper": MAX, "offset": 0}),
        (column_batch_statement("postgresql"), {"lower": 900_000, "upper": MAX}),
    ],
    ids=[
        "latest",
        "first page",
        "deep cursor page",
        "one-day range",
        "as-of",
        "export batch",
        "column batch",
    ],
)
async def test_queries_walk_the_primary_key(
    filled: AsyncEngine, statement: Any, parameters: dict[str, int]
) -> None:
    bound = statement.params(ticker="plan2_usd", limit=1001, **parameters)
    sql = str(bound.compile(dialect=filled.dialect, compile_kwargs={"literal_binds": True}))
    async with filled.connect() as connection:
        explained = "\n".join(row[0] for row in await connection.execute(text("EXPLAIN " + sql)))
    assert "pk_price_ticks" in explained, explained
    assert "Seq Scan" not in explained, explained
    # No sort node (a Merge Append of the partitions' index scans keeps the index order).
    assert re.search(r"\bSort\s+\(cost", explained) is None, explained
