"""The SDK against `/prices/resample` and `/quality` (issue 26), `/settlements` (issue 25), and
an API that requires keys and limits their rate (issue 27)."""

import datetime
import json
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_TS, api_env, store
from crypto_client_sdk import (
    Bucket,
    Client,
    InvalidRequest,
    NotFound,
    RateLimited,
    RetryPolicy,
    Unauthorized,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.settlements import Settlement as DbSettlement
from crypto_client.db.settlements import Settlements
from crypto_client.db.writer import write_transaction
from tests.support import local_http
from tests.support.services import ApiServer, crypto_client

pytestmark = pytest.mark.slow


def raw_pages(api: ApiServer, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every object of a paged endpoint, walked by hand, numbers kept as their literal text."""
    found: list[dict[str, Any]] = []
    url: str | None = api.url + path
    query: dict[str, Any] | None = params
    while url is not None:
        response = local_http.get(url, params=query, timeout=10)
        response.raise_for_status()
        found.extend(json.loads(response.text, parse_float=str, parse_int=str))
        link = response.links.get("next")
        url, query = (api.url + link["url"], None) if link else (None, None)
    return found


async def test_resample_fills_as_asked(api: ApiServer, engine: AsyncEngine) -> None:
    # 5-minute buckets over 30 minutes; minutes 10 to 19 (buckets 2 and 3) have no rows.
    await store(engine, [("btc_usd", f"{m}.10", BASE_TS + 60 * m) for m in range(30) if not 10 <= m < 20])
    first, last = BASE_TS, BASE_TS + 1799
    with Client(api.url, page_size=2) as client:
        none = list(client.resample("btc_usd", "5m", first, last))
        null = list(client.resample("btc_usd", "5m", first, last, fill="null"))
        prev = list(client.resample("btc_usd", "5m", first, last, fill="prev"))
    buckets = [BASE_TS + 300 * b for b in range(6)]
    assert [b.ts for b in none] == [buckets[i] for i in (0, 1, 4, 5)]
    assert all(not b.filled and b.count == 5 for b in none)
    assert [b.price for b in none] == [Decimal("4.10"), Decimal("9.10"), Decimal("24.10"), Decimal("29.10")]
    assert [b.ts for b in null] == buckets
    assert [(b.price, b.filled, b.count) for b in null[2:4]] == [(None, True, 0)] * 2
    assert [(b.price, b.filled) for b in prev[2:4]] == [(Decimal("9.10"), True)] * 2
    assert prev[4] == Bucket(buckets[4], Decimal("24.10"), 5, False, 0, prev[4].trade)
    literal = raw_pages(
        api, "/prices/resample", ticker="btc_usd", interval="5m", fill="prev", from_ts=first, to_ts=last
    )
    assert [format(b.price, "f") if b.price is not None else None for b in prev] == [
        b["price"] for b in literal
    ]


async def test_quality_reports_each_day(api: ApiServer, engine: AsyncEngine) -> None:
    # A tracked day of minutes with the last hour missing: 1,380 of 1,440 slots.
    await store(engine, [("btc_usd", f"{m}.5", BASE_TS + 60 * m) for m in range(1380)])
    async with write_transaction(engine) as writer:
        await writer.track(["btc_usd"], BASE_TS)
    with Client(api.url) as client:
        days = list(client.quality("btc_usd", from_ts=BASE_TS, to_ts=BASE_TS + 86_399))
        with pytest.raises(NotFound):
            list(client.quality("doge_usd"))
    assert [d.date for d in days] == [datetime.date(2026, 1, 1)]
    assert (days[0].expected_slots, days[0].missing_slots) == (1440, 60)
    assert days[0].stored_slots["poll"] == 1380
    assert days[0].completeness == Decimal("0.958333")


async def test_settlements_are_exact_and_paged(api: ApiServer, engine: AsyncEngine) -> None:
    prices = [
        DbSettlement(datetime.date(2026, 1, day), Decimal(price))
        for day, price in ((1, "87512.40"), (2, "0.00000015"), (3, "88001"), (4, "87999.9999"), (5, "1"))
    ]
    async with write_transaction(engine) as writer:
        await Settlements(writer.connection).store("btc_usd", prices)
    literal = raw_pages(api, "/settlements", ticker="btc_usd", limit=3)
    with Client(api.url, page_size=3) as client:
        walked = list(client.settlements("btc_usd"))
        since = list(client.settlements("btc_usd", since=walked[1].date))
        with pytest.raises(InvalidRequest):
            list(client.settlements("btc_usd", since="yesterday"))
        with pytest.raises(NotFound):
            list(client.settlements("doge_usd"))
    assert walked
    assert [(s.date.isoformat(), format(s.delivery_price, "f")) for s in walked] == [
        (s["date"], s["delivery_price"]) for s in literal
    ]
    assert [s.date for s in walked] == sorted(s.date for s in walked)  # oldest first
    assert since == walked[1:]


async def test_the_api_key_is_sent_and_a_429_is_retried_after_its_wait(
    postgresql_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    await store(engine, [("btc_usd", "2291.40", BASE_TS)])
    created = subprocess.run(
        crypto_client("keys", "create", f"sdk-{time.time_ns()}"),
        env={"DATABASE_URL": postgresql_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    env = {**api_env(postgresql_url), "API_KEYS_REQUIRED": "true", "API_RATE_LIMIT": "2/second"}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as api:
        with Client(api.url) as anonymous, pytest.raises(Unauthorized):
            list(anonymous.prices("btc_usd"))
        no_retries = RetryPolicy(max_retries=0)
        with Client(api.url, api_key=key, retry=no_retries) as client:
            assert [p.price for p in client.prices("btc_usd")] == [Decimal("2291.40")]
            with pytest.raises(RateLimited) as limited:
                [list(client.prices("btc_usd")) for _ in range(5)]
        assert limited.value.retry_after is not None
        with Client(api.url, api_key=key, retry=RetryPolicy(max_retries=3)) as patient:
            assert [p.price for p in patient.prices("btc_usd")] == [Decimal("2291.40")]
