"""Settlement (delivery) prices: stored exactly in their own table, served by /settlements,
kept current by the daily job (issue 25)."""

import time
from datetime import date

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.models import PriceTick, SettlementPrice
from crypto_client.ingestion.runtime import open_runtime
from crypto_client.sim.history import TradeHistory
from crypto_client.sim.prices import PriceWalk
from crypto_client.worker.celery_app import celery_app
from tests.support.api import api_client
from tests.support.services import SimServer
from tests.support.settings import make_settings

TICKER = "btc_usd"
DELIVERIES = "public/get_delivery_prices"


def expected(sim: SimServer) -> dict[str, str]:
    history = TradeHistory(PriceWalk(0), 0, int(time.time() * 1000))
    newest = history.delivery_dates(int(time.time() * 1000))
    days = (newest - date(2018, 1, 1)).days + 1
    return {
        (day := date.fromordinal(newest.toordinal() - n)).isoformat(): str(
            history.delivery_price(TICKER, day)
        )
        for n in range(days)
    }


async def test_settlement_prices_are_exact_paged_and_kept_current(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    settings = make_settings(
        db_url,
        tickers=TICKER,
        deribit_rpc_url=sim.rpc_url,
        deribit_history_requests_per_second=20,
        deribit_retry_backoff_seconds=0.01,
    )
    want = expected(sim)
    async with open_runtime(settings) as runtime:
        (report,) = await runtime.update_settlements()
    assert report.error is None
    assert report.total == len(want) > 3000  # years deep, all of it on the first run
    assert report.stored == len(want)
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(PriceTick)) == 0  # never an index row

    async with api_client(settings) as client:
        served: dict[str, str] = {}
        response = await client.get("/settlements", params={"ticker": "BTC_USD", "limit": 1000})
        pages = 1
        while True:
            assert response.status_code == 200, response.text
            body = response.json(parse_float=str)
            served.update((row["date"], row["delivery_price"]) for row in body)
            link = response.headers.get("link")
            if link is None:
                break
            response = await client.get(link[1 : link.index(">")])
            pages += 1
        assert pages == -(-len(want) // 1000)
        assert served == want  # exactly, as Deribit's JSON had them
        assert list(served) == sorted(want)  # oldest first

        window = await client.get(
            "/settlements", params={"ticker": TICKER, "from": "2024-02-27", "to": "2024-03-01"}
        )
        assert [row["date"] for row in window.json()] == [
            "2024-02-27",
            "2024-02-28",
            "2024-02-29",
            "2024-03-01",
        ]
        bad = await client.get(
            "/settlements", params={"ticker": TICKER, "from": "2024-03-02", "to": "2024-03-01"}
        )
        assert bad.status_code == 422
        assert "must not be after" in bad.text

    # The daily job: days published since the last run arrive, in one page, nothing else changes.
    newest = sorted(want)[-3:]
    async with engine.begin() as connection:
        await connection.execute(
            delete(SettlementPrice).where(SettlementPrice.date.in_([date.fromisoformat(d) for d in newest]))
        )
    sim.reset()
    async with open_runtime(settings) as runtime:
        (again,) = await runtime.update_settlements()
    assert again.stored == 3
    assert sim.stats()["requests"][TICKER] == 1  # get_delivery_prices counts by index_name
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(SettlementPrice)) == len(want)


def test_the_daily_job_is_a_beat_entry_that_expires() -> None:
    entry = celery_app.conf.beat_schedule["update-settlements"]
    assert entry["task"] == "crypto_client.update_settlements"
    assert entry["schedule"].interval_seconds == 86_400
    assert entry["options"]["expires"] == 86_400
