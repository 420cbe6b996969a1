"""Candles, as-of lookups, snapshots and exports, on PostgreSQL and SQLite."""

import asyncio
import csv
import io
import json
import time
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.api.schemas import CANDLE_SECONDS, WEEK_ORIGIN
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice, Source
from tests.support import local_http
from tests.support.api import api_client
from tests.support.databases import empty_database, plain_dsn
from tests.support.services import ApiServer
from tests.support.settings import make_settings
from tests.support.waiting import wait_until_async

Row = tuple[int, Decimal, Source]


async def store(engine: AsyncEngine, ticker: str, rows: list[Row]) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many(
            [NewPrice(ticker, price, ts, None, source) for ts, price, source in rows]
        )


def reference_candles(rows: list[Row], interval: str) -> list[dict[str, Any]]:
    """Candles computed the obvious way, for comparison."""
    size, origin = CANDLE_SECONDS[interval], WEEK_ORIGIN if interval == "1w" else 0
    buckets: dict[int, list[Row]] = {}
    for row in sorted(rows):
        buckets.setdefault(row[0] - (row[0] - origin) % size, []).append(row)
    return [
        {
            "ts": bucket,
            "open": members[0][1],
            "high": max(price for _, price, _ in members),
            "low": min(price for _, price, _ in members),
            "close": members[-1][1],
            "count": len(members),
            "backfilled": sum(source == "backfill" for _, _, source in members),
        }
        for bucket, members in sorted(buckets.items())
    ]


async def all_pages(api: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        response = await api.get(next_url)
        assert response.status_code == 200, response.text
        found += json.loads(response.text, parse_float=Decimal)
        next_url = response.links.get("next", {}).get("url")
    return found


def normalized(candles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # JSON numbers (parsed as Decimal), never strings, on both backends.
    assert all(isinstance(c[k], Decimal) for c in candles for k in ("open", "high", "low", "close"))
    return [
        {k: Decimal(str(v)) if k in ("open", "high", "low", "close") else v for k, v in c.items()}
        for c in candles
    ]


prices = st.one_of(
    st.sampled_from([Decimal("1.5"), Decimal("1.50"), Decimal("43521.37")]),  # equal prices
    st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("99999999"), places=8),
)
times = st.one_of(
    st.integers(min_value=0, max_value=30 * 86_400),
    st.integers(min_value=0, max_value=30).map(lambda k: k * 86_400),  # on day edges
    st.integers(min_value=0, max_value=4).map(
        lambda k: WEEK_ORIGIN + k * 604_800 - 1
    ),  # a second before a week
)
datasets = st.dictionaries(times, st.tuples(prices, st.sampled_from(["poll", "backfill"])), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=datasets,
    interval=st.sampled_from(list(CANDLE_SECONDS)),
    limit=st.integers(1, 5),
    batches=st.integers(1, 3),
    shuffle=st.randoms(use_true_random=False),
    bounds=st.tuples(st.integers(0, 31 * 86_400), st.integers(0, 31 * 86_400)).map(sorted),
)
def test_candles_equal_a_straightforward_computation(
    db_url: str,
    data: dict[int, tuple[Decimal, Source]],
    interval: str,
    limit: int,
    batches: int,
    shuffle: Random,
    bounds: list[int],
) -> None:
    """Rows stored in several transactions and in any order (back-fill adds older rows to
    hours already rolled up); candles over the whole history and over arbitrary bounds."""
    rows: list[Row] = [(ts, price, source) for ts, (price, source) in data.items()]
    shuffle.shuffle(rows)
    lower, upper = bounds

    async def check() -> None:
        engine = create_engine(db_url)
        try:
            await empty_database(db_url)
            for batch in range(batches):
                await store(engine, "btc_usd", rows[batch::batches])
            async with api_client(make_settings(db_url, tickers="btc_usd")) as api:
                base = f"/prices/candles?ticker=btc_usd&interval={interval}"
                whole = await all_pages(api, f"{base}&limit=10000")
                paged = await all_pages(api, f"{base}&limit={limit}")
                bounded = await all_pages(api, f"{base}&limit={limit}&from_ts={lower}&to_ts={upper}")
        finally:
            await engine.dispose()
        assert normalized(whole) == reference_candles(rows, interval)
        assert normalized(paged) == reference_candles(rows, interval)
        inside = [row for row in rows if lower <= row[0] <= upper]
        assert normalized(bounded) == reference_candles(inside, interval)

    asyncio.run(check())


async def test_as_of_lookups(engine: AsyncEngine, db_url: str) -> None:
    await store(
        engine,
        "btc_usd",
        [(100, Decimal("1"), "poll"), (200, Decimal("2"), "backfill"), (300, Decimal("3"), "poll")],
    )
    async with api_client(make_settings(db_url)) as api:

        async def at(**params: int) -> httpx.Response:
            return await api.get("/prices/at", params={"ticker": "btc_usd", **params})

        exact = (await at(ts=200)).json()
        assert (exact["ts"], exact["age_seconds"], exact["source"]) == (200, 0, "backfill")
        between = (await at(ts=250)).json()
        assert (between["ts"], between["price"], between["age_seconds"]) == (200, 2, 50)
        assert (await at(ts=99)).status_code == 404
        too_old = await at(ts=250, max_age_seconds=40)
        assert too_old.status_code == 404
        assert "50 s old" in too_old.json()["detail"]
        assert (await at(ts=250, max_age_seconds=50)).status_code == 200
        assert (await at(ts=10**6)).json()["ts"] == 300


async def test_a_snapshot_in_one_call(engine: AsyncEngine, db_url: str) -> None:
    now = int(time.time())
    await store(engine, "btc_usd", [(now - 70, Decimal("1"), "poll"), (now - 10, Decimal("2"), "poll")])
    await store(engine, "sol_usdc", [(now - 5, Decimal("98.5"), "poll")])
    async with api_client(make_settings(db_url, tickers="btc_usd,eth_usd")) as api:
        chosen = (await api.get("/prices/snapshot?ticker=sol_usdc&ticker=BTC_USD&ticker=eth_usd")).json()
        default = (await api.get("/prices/snapshot")).json()
    assert [row["ticker"] for row in chosen] == ["sol_usdc", "btc_usd", "eth_usd"]
    assert (chosen[1]["price"], chosen[1]["ts"]) == (2, now - 10)
    assert 10 <= chosen[1]["age_seconds"] <= 15
    assert chosen[2] == {"ticker": "eth_usd", "price": None, "ts": None, "source": None, "age_seconds": None}
    assert [row["ticker"] for row in default] == ["btc_usd", "eth_usd"]


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
async def test_an_export_equals_the_pages_walked_to_the_end(
    engine: AsyncEngine, db_url: str, fmt: str
) -> None:
    rows: list[Row] = [
        (ts, Decimal(f"{ts}.25") if ts % 7 else Decimal("1E+5"), "poll") for ts in range(1, 25_001)
    ]
    await store(engine, "btc_usd", rows)
    async with api_client(make_settings(db_url)) as api:
        walked = await all_pages(api, "/prices?ticker=btc_usd&limit=10000")
        response = await api.get("/prices/export", params={"ticker": "btc_usd", "format": fmt, "from_ts": 0})
    assert response.status_code == 200
    assert f'filename="btc_usd_0_now.{fmt}"' in response.headers["content-disposition"]
    if fmt == "csv":
        assert response.headers["content-type"].startswith("text/csv")
        exported = list(csv.DictReader(io.StringIO(response.text)))
        assert response.text.startswith("ticker,ts,price,source\n")
        as_rows: list[tuple[str, int, Decimal, str]] = [
            (r["ticker"], int(r["ts"]), Decimal(r["price"]), r["source"]) for r in exported
        ]
        assert "100000," in response.text  # plain decimals
        assert "E+" not in response.text
    else:
        objects = [json.loads(line, parse_float=Decimal) for line in response.text.splitlines()]
        as_rows = [(r["ticker"], r["ts"], Decimal(str(r["price"])), r["source"]) for r in objects]
    assert as_rows == [(r["ticker"], r["ts"], Decimal(r["price"]), r["source"]) for r in walked]
    assert len(as_rows) == 25_000


@pytest.mark.slow
async def test_an_interrupted_export_stops_and_leaves_no_query(postgresql_url: str, tmp_path: Path) -> None:
    connection = await asyncpg.connect(plain_dsn(postgresql_url))
    try:
        # The rows are only something to export: the roll-up triggers would cost a minute.
        await connection.execute("SET session_replication_role = replica")
        await connection.execute("DELETE FROM price_ticks")
        await connection.execute(
            "INSERT INTO price_ticks (ticker, ts, price, slot_ts) "
            "SELECT 'btc_usd', i, 43521.37, NULL FROM generate_series(1, 1000000) AS i"
        )
        env = {"DATABASE_URL": postgresql_url, "LOG_FORMAT": "json"}
        with await asyncio.to_thread(ApiServer.command, "api", env, tmp_path) as server:
            async with (
                local_http.async_client(base_url=server.url) as client,
                client.stream("GET", "/prices/export", params={"ticker": "btc_usd"}) as response,
            ):
                async for _chunk in response.aiter_bytes():
                    break  # the client reads a little, then goes away

            async def stops() -> list[dict[str, Any]]:
                logged = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
                return [entry for entry in logged if entry.get("event") == "export stopped: the client left"]

            (stop,) = await wait_until_async(stops, 10, what="the export to stop")
            # It stopped where the client left: a few batches read, not the million rows.
            assert stop["rows_sent"] < 100_000, stop
            # Rows are ts 1, 2, ...: a new request from resume_from_ts goes on where this one left.
            assert stop["resume_from_ts"] == (stop["rows_sent"] + 1 if stop["rows_sent"] else 0), stop

            async def none_running() -> bool:
                running = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crypto-client-api'"
                    " AND state <> 'idle' AND datname = current_database()"
                )
                return bool(running == 0)

            await wait_until_async(none_running, 10, what="no export query")
    finally:
        await connection.execute("DELETE FROM price_ticks")
        await connection.close()
