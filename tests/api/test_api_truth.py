"""What the API says is true: one answer for an unknown ticker on every endpoint, and the
newest price is what was stored recently, not a row dated in the future."""

import re
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from tests.support.api import api_client
from tests.support.settings import make_settings

UNKNOWN = "nope_usd"
UNKNOWN_DETAIL = (
    "unknown ticker 'nope_usd': it is neither configured nor stored; GET /tickers lists the known ones"
)


@pytest.fixture
async def api(engine: AsyncEngine, db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice("btc_usd", Decimal("43000.5"), 1_000_000)])
    async with api_client(
        make_settings(db_url, tickers="btc_usd,eth_usd", stale_after_seconds=120, api_latest_cache_seconds=0)
    ) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/prices", {}),
        ("/prices/latest", {}),
        ("/prices/range", {"from_ts": 0}),
        ("/prices/candles", {"interval": "1h"}),
        ("/prices/at", {"ts": 2_000_000}),
        ("/prices/snapshot", {}),
        ("/prices/stream", {}),
        ("/prices/export", {"format": "ndjson"}),
        ("/coverage", {}),
        ("/prices/resample", {"interval": "1h", "from_ts": 0, "to_ts": 86_400}),
        ("/quality", {"from_ts": 0, "to_ts": 86_400}),
        ("/settlements", {}),
    ],
)
async def test_an_unknown_ticker_is_the_same_404_on_every_endpoint(
    api: httpx.AsyncClient, path: str, params: dict[str, str | int]
) -> None:
    response = await api.get(path, params={"ticker": UNKNOWN, **params})
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": UNKNOWN_DETAIL}
    # A known ticker on the same endpoint is not refused (the stream is not opened here).
    if path != "/prices/stream":
        known = await api.get(path, params={"ticker": "btc_usd", **params})
        assert known.status_code == 200, known.text


async def test_a_snapshot_with_one_unknown_ticker_among_known_ones_is_a_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/prices/snapshot", params=[("ticker", "btc_usd"), ("ticker", UNKNOWN)])
    assert (response.status_code, response.json()) == (404, {"detail": UNKNOWN_DETAIL})
    # A configured ticker without rows is known: nulls, as documented.
    configured = await api.get("/prices/snapshot", params={"ticker": "eth_usd"})
    assert configured.json() == [
        {"ticker": "eth_usd", "price": None, "ts": None, "source": None, "age_seconds": None}
    ]


async def test_a_row_dated_in_the_future_does_not_pass_for_the_newest_price(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Nothing has been stored for an hour; one row claims to be from next year. The newest
    price is the hour-old one, and readiness says it is stale."""
    now = int(time.time())
    async with write_transaction(engine) as writer:
        for ticker in ("btc_usd", "eth_usd"):
            await writer.insert_many(
                [
                    NewPrice(ticker, Decimal("41000.25"), now - 3600),
                    NewPrice(ticker, Decimal("99999.99"), now + 365 * 86_400),
                ]
            )

    latest = (await api.get("/prices/latest", params={"ticker": "btc_usd"})).json()
    assert (latest["ts"], latest["price"]) == (now - 3600, 41000.25)
    assert latest["age_seconds"] >= 3600
    snapshot = (await api.get("/prices/snapshot")).json()
    assert [(row["ticker"], row["ts"]) for row in snapshot] == [
        ("btc_usd", now - 3600),
        ("eth_usd", now - 3600),
    ]
    ready = await api.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert set(ready.json()["stale"]) == {"btc_usd", "eth_usd"}
    assert re.fullmatch(r"newest price is 36\d\d s old \(more than 120 s\)", ready.json()["stale"]["btc_usd"])
    newest_gauge = (await api.get("/metrics")).text
    assert "99999.99" not in newest_gauge

    # A row a second ahead of this clock (hosts' clocks differ a little) is the newest price.
    async with write_transaction(engine) as writer:
        await writer.insert_many([NewPrice("btc_usd", Decimal("41001"), now + 1)])
    assert (await api.get("/prices/latest", params={"ticker": "btc_usd"})).json()["ts"] == now + 1
