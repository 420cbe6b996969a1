"""`to_pandas()` / `to_polars()`: the price an exact decimal column, every row."""

from decimal import Decimal

import pandas
import polars
import pytest
from conftest import BASE_TS, store
from crypto_client_sdk import AsyncClient, Client
from sqlalchemy.ext.asyncio import AsyncEngine
from test_sdk_rows import TRICKY_PRICES

from tests.support.services import ApiServer

pytestmark = pytest.mark.slow


async def test_frames_hold_every_row_with_the_exact_price(api: ApiServer, engine: AsyncEngine) -> None:
    await store(engine, [("btc_usd", text, BASE_TS + 60 * i) for i, text in enumerate(TRICKY_PRICES)])
    expected = [Decimal(text) for text in TRICKY_PRICES]
    timestamps = [BASE_TS + 60 * i for i in range(len(TRICKY_PRICES))]
    with Client(api.url, page_size=3) as client:
        rows = client.prices("btc_usd")
        frame = rows.to_pandas()
        lazy = rows.to_polars()
        candles = client.candles("btc_usd", "1h").to_polars()

    assert list(frame.columns) == ["ticker", "price", "ts", "source"]
    assert frame["price"].dtype == object
    assert frame["price"].tolist() == expected
    assert [format(p, "f") for p in frame["price"]] == list(TRICKY_PRICES)
    assert frame["ts"].tolist() == timestamps
    assert set(frame["source"]) == {"poll"}

    assert lazy.schema["price"] == polars.Decimal(38, 18)
    assert lazy["price"].to_list() == expected
    assert lazy["ts"].to_list() == timestamps
    assert lazy["ticker"].to_list() == ["btc_usd"] * len(TRICKY_PRICES)
    # Arithmetic stays exact too, at 18 places.
    assert lazy["price"][:2].sum() == Decimal("2291.40000015")

    assert candles.schema["open"] == polars.Decimal(38, 18)
    assert candles["high"].to_list() == [max(expected)]
    assert candles["count"].to_list() == [len(TRICKY_PRICES)]

    async with AsyncClient(api.url, page_size=3) as async_client:
        async_frame = await async_client.prices("btc_usd").to_pandas()
        async_lazy = await async_client.prices("btc_usd").to_polars()
    pandas.testing.assert_frame_equal(async_frame, frame)
    assert async_lazy.equals(lazy)
