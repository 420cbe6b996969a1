"""Every row across pages, exact prices, the other endpoints and their errors, sync and async."""

import json
from decimal import Decimal

import pytest
from conftest import BASE_TS, store
from crypto_client_sdk import (
    AsyncClient,
    Candle,
    Client,
    Coverage,
    InvalidRequest,
    LatestPrice,
    NotFound,
    Price,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.writer import write_transaction
from tests.support import local_http
from tests.support.databases import stored_rows
from tests.support.services import ApiServer

pytestmark = pytest.mark.slow

# Decimal places a float would lose or change: a trailing zero, an exponent-sized fraction,
# the 38 significant digits the service accepts at most (below 10^20, 18 places), an integer.
TRICKY_PRICES = (
    "2291.40",
    "0.00000015",
    "99999999999999999999.999999999999999999",
    "12345678901234567890.123456789012345678",
    "0.000000000000000001",
    "60",
    "0.1",
    "100000.000000000000000000",
)


async def test_prices_walks_every_page_and_equals_the_database(api: ApiServer, engine: AsyncEngine) -> None:
    await store(engine, [("btc_usd", f"{i}.{i % 100:02d}", BASE_TS + 60 * i) for i in range(1, 1001)])
    await store(engine, [("eth_usd", "1.5", BASE_TS)])
    expected = [Price(r.ticker, r.price, r.ts, r.source) for r in await stored_rows(engine, "btc_usd")]
    assert len(expected) == 1000

    with Client(api.url, page_size=37) as client:
        walked = list(client.prices("btc_usd"))
        bounded = list(client.prices("btc_usd", from_ts=BASE_TS + 60 * 100, to_ts=BASE_TS + 60 * 900))
    assert walked == expected  # 28 pages, each row once, oldest first
    assert [str(p.price) for p in walked[:3]] == ["1.01", "2.02", "3.03"]
    assert bounded == [p for p in expected if BASE_TS + 6000 <= p.ts <= BASE_TS + 54000]
    assert len(bounded) == 801


async def test_prices_are_exact_decimals_never_floats(api: ApiServer, engine: AsyncEngine) -> None:
    await store(engine, [("btc_usd", text, BASE_TS + 60 * i) for i, text in enumerate(TRICKY_PRICES)])
    with Client(api.url) as client:
        rows = list(client.prices("btc_usd"))
        latest = client.latest("btc_usd")
    # The Decimal of the server's exact text: the same digits and places as the JSON literal.
    raw = local_http.get(f"{api.url}/prices", params={"ticker": "btc_usd"}).text
    literals = [row["price"] for row in json.loads(raw, parse_float=str, parse_int=str)]
    assert [format(row.price, "f") for row in rows] == literals == list(TRICKY_PRICES)
    assert [row.price for row in rows] == [Decimal(text) for text in TRICKY_PRICES]
    assert all(type(row.price) is Decimal for row in rows)
    assert str(rows[0].price) == "2291.40"
    assert str(rows[2].price) == "99999999999999999999.999999999999999999"
    assert rows[2].price.as_tuple().digits == (9,) * 38
    assert isinstance(latest, LatestPrice)
    assert (latest.price, latest.ts) == (Decimal("100000.000000000000000000"), BASE_TS + 60 * 7)
    assert format(latest.price, "f") == "100000.000000000000000000"
    assert latest.age_seconds > 0


async def test_unknown_ticker_and_bad_parameters_raise_with_the_servers_detail(api: ApiServer) -> None:
    with Client(api.url) as client:
        with pytest.raises(NotFound) as unknown:
            list(client.prices("doge_usd"))
        with pytest.raises(NotFound) as no_price:
            client.latest("btc_usd")
        with pytest.raises(InvalidRequest) as bounds:
            list(client.prices("btc_usd", from_ts=BASE_TS + 1, to_ts=BASE_TS))
        with pytest.raises(InvalidRequest) as interval:
            list(client.candles("btc_usd", "7m"))
    assert unknown.value.status == 404
    assert unknown.value.detail == (
        "unknown ticker 'doge_usd': it is neither configured nor stored; GET /tickers lists the known ones"
    )
    assert no_price.value.detail == "no price stored for ticker 'btc_usd' yet"
    assert bounds.value.status == 422
    assert "must not be after to_ts" in str(bounds.value.detail)
    assert "interval" in str(interval.value.detail)


async def test_candles_and_coverage(api: ApiServer, engine: AsyncEngine) -> None:
    # Two hours of minutes tracked, with minutes 70 to 79 and 100 to 104 missing.
    minutes = [m for m in range(120) if not (70 <= m < 80 or 100 <= m < 105)]
    await store(engine, [("btc_usd", f"{100 + m}.5", BASE_TS + 60 * m) for m in minutes])
    async with write_transaction(engine) as writer:
        await writer.track(["btc_usd"], BASE_TS)
    with Client(api.url, page_size=1) as client:
        candles = list(client.candles("btc_usd", "1h"))
        coverage = client.coverage("btc_usd", from_ts=BASE_TS, to_ts=BASE_TS + 7199)
    assert candles == [
        Candle(BASE_TS, Decimal("100.5"), Decimal("159.5"), Decimal("100.5"), Decimal("159.5"), 60, 0),
        Candle(BASE_TS + 3600, Decimal("160.5"), Decimal("219.5"), Decimal("160.5"), Decimal("219.5"), 45, 0),
    ]
    assert isinstance(coverage, Coverage)
    assert coverage.expected_slots == 120
    assert coverage.stored_slots["poll"] == 105
    assert coverage.missing_slots == 15
    assert [(g.from_ts, g.to_ts, g.slots) for g in coverage.gaps] == [  # one gap a page
        (BASE_TS + 4200, BASE_TS + 4799, 10),
        (BASE_TS + 6000, BASE_TS + 6299, 5),
    ]


async def test_the_async_twin_gives_the_same_answers(api: ApiServer, engine: AsyncEngine) -> None:
    await store(engine, [("btc_usd", text, BASE_TS + 60 * i) for i, text in enumerate(TRICKY_PRICES)])
    await store(engine, [("btc_usd", f"{i}.25", BASE_TS + 60 * i) for i in range(100, 400)])
    with Client(api.url, page_size=50) as client:
        expected = list(client.prices("btc_usd"))
        expected_candles = list(client.candles("btc_usd", "1h"))
        expected_latest = client.latest("btc_usd")
    async with AsyncClient(api.url, page_size=50) as client:
        walked = [row async for row in client.prices("btc_usd")]
        candles = await client.candles("btc_usd", "1h").collect()
        latest = await client.latest("btc_usd")
        with pytest.raises(NotFound, match="unknown ticker 'doge_usd'"):
            await client.prices("doge_usd").collect()
    assert len(walked) == 308
    assert walked == expected
    assert candles == expected_candles
    assert (latest.ticker, latest.price, latest.ts) == (
        expected_latest.ticker,
        expected_latest.price,
        expected_latest.ts,
    )
