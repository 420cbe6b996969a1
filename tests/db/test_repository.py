import json
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice, PriceRow


async def insert(engine: AsyncEngine, *ticks: NewPrice) -> list[tuple[str, int]]:
    async with engine.begin() as connection:
        return await PriceWriter(connection).insert_many(list(ticks))


async def page(engine: AsyncEngine, ticker: str, **kwargs: int | None) -> list[PriceRow]:
    async with engine.connect() as connection:
        result = await PriceReader(connection).page_json(ticker, **kwargs)  # type: ignore[arg-type]
    ticks = [PriceRow(**row) for row in json.loads(result.json, parse_float=Decimal)]
    assert len(ticks) == result.rows
    return ticks


async def test_insert_reports_new_rows_and_ignores_duplicates(engine: AsyncEngine) -> None:
    first = await insert(
        engine, NewPrice("btc_usd", Decimal("1.5"), 100), NewPrice("eth_usd", Decimal("2.5"), 100)
    )
    assert sorted(first) == [("btc_usd", 100), ("eth_usd", 100)]

    again = await insert(
        engine, NewPrice("btc_usd", Decimal("9.9"), 100), NewPrice("btc_usd", Decimal("3"), 160)
    )
    assert again == [("btc_usd", 160)]
    assert [t.price for t in await page(engine, "btc_usd", limit=10)] == [Decimal("1.5"), Decimal("3")]


async def test_one_row_per_ticker_and_slot(engine: AsyncEngine) -> None:
    assert await insert(engine, NewPrice("btc_usd", Decimal("1"), 61, slot_ts=60)) == [("btc_usd", 61)]
    # A second observation for the same slot (another beat, a redelivered task) is not stored.
    assert await insert(engine, NewPrice("btc_usd", Decimal("2"), 75, slot_ts=60)) == []
    # Rows without a slot never collide on it.
    assert (
        len(
            await insert(engine, NewPrice("btc_usd", Decimal("3"), 80), NewPrice("btc_usd", Decimal("4"), 81))
        )
        == 2
    )
    assert [t.ts for t in await page(engine, "btc_usd", limit=10)] == [61, 80, 81]


@pytest.mark.parametrize(
    "text", ["43521.37", "0.00012345", "1234567.89012345", "2291.40", "0.00000921", "1E-8"]
)
async def test_prices_round_trip_exactly(engine: AsyncEngine, text: str) -> None:
    await insert(engine, NewPrice("btc_usd", Decimal(text), 1))
    async with engine.connect() as connection:
        latest = await PriceReader(connection).latest("btc_usd")
    assert latest is not None
    assert latest.price == Decimal(text)
    assert str(latest.price) == str(Decimal(text))


async def test_latest_is_the_newest_row_of_that_ticker(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert await PriceReader(connection).latest("btc_usd") is None
    await insert(
        engine,
        NewPrice("btc_usd", Decimal("1"), 10),
        NewPrice("btc_usd", Decimal("3"), 30),
        NewPrice("btc_usd", Decimal("2"), 20),
        NewPrice("eth_usd", Decimal("9"), 99),
    )
    async with engine.connect() as connection:
        assert await PriceReader(connection).latest("btc_usd") == PriceRow(
            "btc_usd", Decimal("3"), 30, "poll"
        )


async def test_range_bounds_are_inclusive_and_optional(engine: AsyncEngine) -> None:
    await insert(engine, *(NewPrice("btc_usd", Decimal(ts), ts) for ts in range(10, 60, 10)))
    assert [t.ts for t in await page(engine, "btc_usd", limit=100, from_ts=20, to_ts=40)] == [20, 30, 40]
    assert [t.ts for t in await page(engine, "btc_usd", limit=100, from_ts=40)] == [40, 50]
    assert [t.ts for t in await page(engine, "btc_usd", limit=100, to_ts=20)] == [10, 20]
    assert await page(engine, "btc_usd", limit=100, from_ts=41, to_ts=49) == []
    assert await page(engine, "eth_usd", limit=100) == []


async def test_offset_pages(engine: AsyncEngine) -> None:
    await insert(engine, *(NewPrice("btc_usd", Decimal(ts), ts) for ts in range(1, 8)))
    assert [t.ts for t in await page(engine, "btc_usd", limit=3, offset=3)] == [4, 5, 6]
    assert [t.ts for t in await page(engine, "btc_usd", limit=3, offset=6)] == [7]


async def test_keyset_pages_neither_skip_nor_repeat_while_rows_arrive(engine: AsyncEngine) -> None:
    await insert(engine, *(NewPrice("btc_usd", Decimal(ts), ts) for ts in range(0, 100, 10)))
    seen: list[int] = []
    start: int | None = None
    next_ts = 100
    pages = 0
    while True:
        async with engine.connect() as connection:
            result = await PriceReader(connection).page_json("btc_usd", limit=3, start_ts=start)
        seen.extend(row["ts"] for row in json.loads(result.json))
        pages += 1
        if next_ts < 130:  # new ticks land between page reads, as ingestion does
            await insert(engine, NewPrice("btc_usd", Decimal(next_ts), next_ts))
            next_ts += 10
        if result.next_ts is None:
            break
        start = result.next_ts
    assert seen == list(range(0, 130, 10))
    assert pages == 5


async def test_page_json_is_exact_compact_json(engine: AsyncEngine) -> None:
    await insert(
        engine,
        NewPrice("drbfix-btc_usdc", Decimal("43521.37"), 1),
        NewPrice("drbfix-btc_usdc", Decimal("1E-8"), 2),
    )
    async with engine.connect() as connection:
        result = await PriceReader(connection).page_json("drbfix-btc_usdc", limit=1)
        empty = await PriceReader(connection).page_json("eth_usd", limit=5)
    assert result == ('[{"ticker":"drbfix-btc_usdc","price":43521.37,"ts":1,"source":"poll"}]', 1, 2)
    assert empty == ("[]", 0, None)


async def test_ticker_stats(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert await PriceReader(connection).ticker_stats() == []
    await insert(
        engine,
        NewPrice("eth_usd", Decimal("1"), 5),
        NewPrice("btc_usd", Decimal("1"), 10),
        NewPrice("btc_usd", Decimal("1"), 30),
    )
    async with engine.connect() as connection:
        stats = await PriceReader(connection).ticker_stats()
    assert [tuple(s) for s in stats] == [("btc_usd", 2, 10, 30), ("eth_usd", 1, 5, 5)]


async def test_large_batches_are_chunked(engine: AsyncEngine) -> None:
    rows = [NewPrice("btc_usd", Decimal("1.25"), ts) for ts in range(5000)]
    assert len(await insert(engine, *rows)) == 5000
    assert len(await insert(engine, *rows)) == 0
