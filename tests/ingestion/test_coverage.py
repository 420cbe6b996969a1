"""Coverage and repair: every missing slot visible with its reason, back-filled from the
simulator's own history over HTTP, on PostgreSQL and SQLite."""

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.config import Settings
from crypto_client.coverage import explain
from crypto_client.db.ledger import SlotSpan
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice, SlotFailure, current_slot
from crypto_client.ingestion.runtime import IngestionRuntime, pending_write_seconds
from tests.support import launcher, local_http
from tests.support.api import api_client
from tests.support.services import ApiServer, SimServer, crypto_client
from tests.support.settings import ingestion_settings, make_settings
from tests.support.waiting import wait_until, wait_until_async

TICKER = "btc_usd"


def test_a_missing_run_is_split_by_the_recorded_reasons() -> None:
    failures = [
        SlotFailure(TICKER, 20, "deribit_failed", "503"),
        SlotFailure(TICKER, 30, "deribit_failed", "503"),
        SlotFailure(TICKER, 50, "late", "slow"),
    ]
    gaps = explain(SlotSpan(10, 60), failures, 10)
    assert [(g.from_ts, g.to_ts, g.slots, g.reason) for g in gaps] == [
        (10, 19, 1, "no_tick_ran"),
        (20, 39, 2, "deribit_failed"),
        (40, 49, 1, "no_tick_ran"),
        (50, 59, 1, "late"),
        (60, 69, 1, "no_tick_ran"),
    ]


async def tick_at(runtime: IngestionRuntime, slot: int) -> int:
    """The tick of `slot`, run once the slot has begun (at once if it already has)."""
    await asyncio.sleep(max(0.0, slot - time.time()))
    await runtime.run_tick(slot)
    return slot


async def stored_tick(runtime: IngestionRuntime) -> int:
    """The slot of the next tick that stores its price (on a loaded machine one may be late)."""
    while True:
        slot = current_slot(1) + 1
        await asyncio.sleep(max(0.0, slot - time.time()))
        if (await runtime.run_tick(slot)).count("stored"):
            return slot


async def polled_rows(engine: AsyncEngine) -> list[tuple[int, int, str, str]]:
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT slot_ts, ts, price, source FROM price_ticks WHERE ticker = 'btc_usd' ORDER BY ts")
        )
        return [(slot, ts, str(price), source) for slot, ts, price, source in result]


@pytest.mark.long
@pytest.mark.slow
async def test_failed_slots_are_listed_then_back_filled_exactly(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    settings = ingestion_settings(
        sim,
        db_url,
        tickers=TICKER,
        ingest_interval_seconds=1,
        deribit_max_retries=0,
        deribit_timeout_seconds=2,
        ingest_max_write_delay_seconds=0,
    )
    async with DeribitHttpClient(sim.rpc_url, timeout=2, max_retries=0) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        first = await stored_tick(runtime)
        sim.faults(TICKER, outage=True)
        # Consecutive slots whatever the machine's load: a tick that finds Deribit down fails
        # the same way, late or not.
        failed = [await tick_at(runtime, first + n) for n in (1, 2, 3)]
        sim.reset()
        await asyncio.sleep(max(0.0, failed[-1] + 1.05 - time.time()))  # the last slot is complete
    before = await polled_rows(engine)

    last = failed[-1]  # the window's end: later slots are not this test's
    window: dict[str, str | int] = {"ticker": TICKER, "from_ts": first, "to_ts": last}
    async with api_client(settings) as api:
        response = await api.get("/coverage", params=window)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["missing_slots"] == 3
        assert [(g["from_ts"], g["slots"], g["reason"]) for g in body["gaps"]] == [
            (failed[0], 3, "deribit_failed")
        ]
        assert "503" in body["gaps"][0]["detail"]
        assert body["stored_slots"]["poll"] == body["expected_slots"] - 3

        # A slot is repaired once no write of its own may still be pending.
        await asyncio.sleep(max(0.0, last + 1 + pending_write_seconds(settings) - time.time()))
        backfill = launcher.run(
            # Up to the window's end: slots after the last tick are not this test's.
            crypto_client("backfill", "--ticker", TICKER, "--to-ts", str(last)),
            env={
                "DATABASE_URL": db_url,
                "DERIBIT_RPC_URL": sim.rpc_url,
                "INGEST_INTERVAL_SECONDS": "1",
                "INGEST_MAX_WRITE_DELAY_SECONDS": "0",
                "DERIBIT_MAX_RETRIES": "0",
                "DERIBIT_TIMEOUT_SECONDS": "2",
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert backfill.returncode == 0, backfill.stderr
        assert "filled       3" in backfill.stdout, backfill.stdout

        after = (await api.get("/coverage", params=window)).json()
        assert (after["missing_slots"], after["coverage"], after["gaps"]) == (0, 1.0, [])
        assert after["stored_slots"]["backfill"] == 3
        prices = (await api.get("/prices", params={"ticker": TICKER})).json()
    chart = dict(sim.chart(TICKER, "1h"))
    filled = [row for row in prices if row["source"] == "backfill"]
    assert len(filled) == 3
    for row in filled:
        slot = row["ts"] // 1 * 1
        assert slot in failed
        first_point = min(ts for ts in chart if ts // 1000 == slot)
        assert (row["ts"], Decimal(str(row["price"]))) == (
            first_point // 1000,
            Decimal(str(chart[first_point])),
        )
    # No polled row changed.
    assert [r for r in await polled_rows(engine) if r[3] == "poll"] == before


async def test_an_old_gap_is_filled_only_where_a_coarser_point_falls_in_a_slot(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    now = int(time.time())
    since = now - 7200  # tracked two hours ago; nothing ran until now
    async with engine.begin() as connection:
        await PriceWriter(connection).track([TICKER], since)
    # The statement timeout's guard is test_hardening's: here a CI machine starved of CPU must
    # not turn this ~0.3 s read of two hours of slots into a 503 (seen at 7.8 s).
    settings = ingestion_settings(
        sim, db_url, tickers=TICKER, ingest_interval_seconds=1, api_statement_timeout_seconds=60
    )
    old_end = now - 3700  # older than the 1h range reaches
    async with DeribitHttpClient(sim.rpc_url, timeout=5) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        (report,) = await runtime.backfill(from_ts=since, to_ts=old_end)
    assert report.ok
    assert report.ranges == ["1d"]
    chart = sim.chart(TICKER, "1d")
    expected = {}
    for ts_ms, price in chart:
        slot = ts_ms // 1000
        if since <= slot <= old_end and slot not in expected:
            expected[slot] = (ts_ms // 1000, Decimal(str(price)))
    assert 400 < report.filled == len(expected)  # 6 s apart over ~3500 one-second slots
    assert report.not_repairable == report.missing - report.filled
    stored = {slot: (ts, Decimal(price)) for slot, ts, price, _ in await polled_rows(engine)}
    assert stored == expected
    async with api_client(settings) as api:
        body = (
            await api.get("/coverage", params={"ticker": TICKER, "from_ts": since, "to_ts": old_end})
        ).json()
    reasons = {gap["reason"] for gap in body["gaps"]}
    assert reasons == {"not_repairable"}
    assert "1d" in body["gaps"][0]["detail"]
    assert body["stored_slots"]["backfill"] == report.filled


async def test_readyz_follows_freshness_and_livez_does_no_io(engine: AsyncEngine, db_url: str) -> None:
    settings = make_settings(db_url, tickers="btc_usd,eth_usd", stale_after_seconds=3)
    async with api_client(settings) as api:
        assert (await api.get("/livez")).status_code == 200
        not_ready = await api.get("/readyz")
        assert not_ready.status_code == 503
        assert set(not_ready.json()["stale"]) == {"btc_usd", "eth_usd"}
        now = int(time.time())
        async with engine.begin() as connection:
            await PriceWriter(connection).insert_many(
                [NewPrice("btc_usd", Decimal("1"), now), NewPrice("eth_usd", Decimal("2"), now)]
            )
        ready = await api.get("/readyz")
        assert (ready.status_code, ready.json()["stale"]) == (200, {})

        async def stale() -> dict[str, Any] | None:
            response = await api.get("/readyz")
            body: dict[str, Any] = response.json()
            return body if response.status_code == 503 else None

        went_stale = await wait_until_async(stale, 10, interval=0.2, what="/readyz to go stale")
        assert went_stale is not None
        assert "old" in went_stale["stale"]["btc_usd"]
        async with engine.begin() as connection:
            await PriceWriter(connection).insert_many(
                [NewPrice(t, Decimal("3"), int(time.time()) + 1) for t in ("btc_usd", "eth_usd")]
            )
        assert (await api.get("/readyz")).status_code == 200
        latest = (await api.get("/prices/latest", params={"ticker": "btc_usd"})).json()
        assert latest["source"] == "poll"
        assert 0 <= latest["age_seconds"] <= 5
        tickers = {t["ticker"]: t for t in (await api.get("/tickers")).json()}
        assert tickers["btc_usd"]["age_seconds"] is not None
        assert tickers["btc_usd"]["coverage_24h"] is None  # never tracked by a tick


@pytest.mark.long
@pytest.mark.slow
def test_serve_repairs_recent_gaps_by_itself(sim: SimServer, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'repair.db'}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": TICKER,
        "INGEST_INTERVAL_SECONDS": "1",
        "BACKFILL_INTERVAL_SECONDS": "2",
        "DERIBIT_MAX_RETRIES": "0",
        "DERIBIT_TIMEOUT_SECONDS": "1",
        "INGEST_MAX_WRITE_DELAY_SECONDS": "0",
        "LOG_FORMAT": "json",
    }
    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:

        def coverage() -> dict[str, Any]:
            body: dict[str, Any] = server.get("/coverage", ticker=TICKER).json()
            return body

        wait_until(lambda: coverage()["stored_slots"]["poll"] >= 2, 15, what="first polls")
        sim.faults(TICKER, outage=True)
        wait_until(lambda: any(g["reason"] == "deribit_failed" for g in coverage()["gaps"]), 15, what="a gap")
        wait_until(lambda: coverage()["missing_slots"] >= 2, 15, what="an outage of a few slots")
        local_http.delete(f"{sim.url}/_sim/faults").raise_for_status()
        repaired = wait_until(
            lambda: (
                (body := coverage())["stored_slots"]["backfill"] >= 2 and body["missing_slots"] == 0 and body
            ),
            # The repair leaves a slot alone for the bound on pending writes (16 s here).
            60,
            what="the automatic repair",
        )
    assert repaired["coverage"] == 1.0
    assert '"backfill finished"' in server.output


async def test_the_automatic_repair_does_not_ask_again_for_what_cannot_be_repaired(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    async with engine.begin() as connection:
        await PriceWriter(connection).track([TICKER], int(time.time()) - 7200)  # two hours untouched
    settings = ingestion_settings(sim, db_url, tickers=TICKER, ingest_interval_seconds=1)
    async with DeribitHttpClient(sim.rpc_url, timeout=5) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        (first,) = await runtime.repair_recent() or []
        (second,) = await runtime.repair_recent() or []
        (by_hand,) = await runtime.backfill(dry_run=True)
    # The first run fills the last hour and records the coarser hour before it as mostly
    # not repairable; the second does not fetch that coarse history again.
    assert "1d" in first.ranges
    assert first.not_repairable > 1000
    assert "1d" not in second.ranges
    assert second.missing < 100
    # By hand, those slots are still tried.
    assert "1d" in by_hand.ranges


def quick_settings(sim: SimServer, db_url: str, **overrides: object) -> Settings:
    """1 s slots whose writes are never pending long: their repair may start 17 s after them."""
    values: dict[str, object] = {
        "tickers": TICKER,
        "ingest_interval_seconds": 1,
        "ingest_max_write_delay_seconds": 0,
        "deribit_max_retries": 0,
        "deribit_timeout_seconds": 2,
        **overrides,
    }
    return ingestion_settings(sim, db_url, **values)


async def test_bad_history_points_are_skipped_and_the_rest_used(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    since = int(time.time()) - 300
    async with engine.begin() as connection:
        await PriceWriter(connection).track([TICKER], since)
    sim.faults(TICKER, chart_bad_point_rate=0.3)
    settings = quick_settings(sim, db_url)
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=0) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        with capture_logs() as logs:
            (report,) = await runtime.backfill()
    assert report.ok, report.error
    assert report.missing > 250
    # Points come 0.6 s apart: most 1 s slots keep a good one.
    assert report.filled > report.missing // 2
    skipped = [entry for entry in logs if entry["event"] == "history points skipped"]
    assert skipped, "no log line for the skipped points"
    assert (skipped[0]["ticker"], skipped[0]["range"]) == (TICKER, "1h")
    assert any("None" in point for point in skipped[0]["points"])
    sim.reset()
    chart = dict(sim.chart(TICKER, "1h"))
    stored = [row for row in await polled_rows(engine) if row[3] == "backfill"]
    assert len(stored) == report.filled
    for slot, ts, price, _ in stored:
        # Each row is a true point of Deribit's history inside its slot, exactly.
        assert any(ts_ms // 1000 == ts and Decimal(str(p)) == Decimal(price) for ts_ms, p in chart.items())
        assert slot == ts


@pytest.mark.parametrize("fault", ["chart_empty_rate", "chart_out_of_window_rate"])
async def test_an_answer_without_history_is_retried_later_not_given_up(
    sim: SimServer, engine: AsyncEngine, db_url: str, fault: str
) -> None:
    since = int(time.time()) - 300
    async with engine.begin() as connection:
        await PriceWriter(connection).track([TICKER], since)
    settings = quick_settings(sim, db_url, backfill_interval_seconds=2)
    sim.faults(TICKER, **{fault: 1.0})
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=0) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        (first,) = await runtime.repair_recent() or []
        assert (first.filled, first.not_repairable) == (0, 0)
        assert first.history_unavailable == first.missing > 250
        window: dict[str, str | int] = {"ticker": TICKER, "from_ts": since, "to_ts": since + 200}
        async with api_client(settings) as api:
            gaps = (await api.get("/coverage", params=window)).json()["gaps"]
        assert {gap["reason"] for gap in gaps} == {"history_unavailable"}
        assert gaps[0]["detail"].startswith("attempt 1, retried after ")

        # Backing off: the next run, at once, does not ask again for those slots.
        (second,) = await runtime.repair_recent() or []
        assert second.missing < 5  # only slots that have just become old enough
        sim.reset()

        async def repaired() -> bool:
            (report,) = await runtime.repair_recent() or []
            return report.filled > 250

        await wait_until_async(repaired, 20, interval=0.5, what="the retry after the backoff")
    async with api_client(settings) as api:
        body = (await api.get("/coverage", params=window)).json()
    assert (body["missing_slots"], body["gaps"]) == (0, [])


async def test_the_repair_leaves_slots_whose_writes_may_still_be_pending(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    since = int(time.time()) - 150
    async with engine.begin() as connection:
        await PriceWriter(connection).track([TICKER], since)
    settings = quick_settings(sim, db_url, ingest_max_write_delay_seconds=30)
    # A tick writes within 2 s of fetching plus 30 s of retries; a stream batch may wait 2 x 30 s.
    assert pending_write_seconds(settings) == 60 + 15
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=0) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        (report,) = await runtime.backfill()
    finished = time.time()
    filled = [slot for slot, _, _, source in await polled_rows(engine) if source == "backfill"]
    assert len(filled) == report.filled > 50
    # No slot that ended within the bound of the run was touched.
    assert max(filled) + 1 <= finished - pending_write_seconds(settings)
    assert max(filled) + 1 >= finished - pending_write_seconds(settings) - 5
