"""The ingestion function against the simulator over HTTP and a real database."""

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.config import Settings
from crypto_client.db.engine import create_engine
from crypto_client.domain import PriceRow
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.tick import TickSummary
from tests.support import launcher
from tests.support.databases import create_pg_database, stored_rows
from tests.support.services import SimServer, ThrowawayPostgres, crypto_client
from tests.support.settings import INGEST_TICKERS, ingestion_settings
from tests.support.slots import roomy_slot, roomy_slot_blocking
from tests.support.waiting import wait_until_async

TICKERS = ",".join(INGEST_TICKERS)


async def ingest_tick(
    source: DeribitHttpClient, engine: AsyncEngine, settings: Settings, *, slot_ts: int | None
) -> TickSummary:
    return await IngestionRuntime(settings, engine, source, source).run_tick(slot_ts)


async def stored(engine: AsyncEngine, ticker: str) -> list[PriceRow]:
    return await stored_rows(engine, ticker)


async def test_every_ticker_is_stored_with_deribits_time(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    sim.pin(btc_usd="43521.37")
    before = int(time.time())
    summary = await ingest_tick(deribit, engine, ingestion_settings(sim, db_url), slot_ts=await roomy_slot())
    assert summary.ok
    assert [o.status for o in summary.outcomes] == ["stored"] * 3
    for ticker in TICKERS.split(","):
        rows = await stored(engine, ticker)
        assert len(rows) == 1
        assert before - 1 <= rows[0].ts <= time.time() + 1
    assert (await stored(engine, "btc_usd"))[0].price == Decimal("43521.37")


async def test_one_failing_ticker_does_not_block_the_others(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    sim.faults("eth_usd", outage=True)
    settings = ingestion_settings(sim, db_url, tickers=TICKERS + ",no_such_index")
    summary = await ingest_tick(deribit, engine, settings, slot_ts=await roomy_slot())
    status = {o.ticker: o.status for o in summary.outcomes}
    assert status == {
        "btc_usd": "stored",
        "sol_usdc": "stored",
        "eth_usd": "failed",
        "no_such_index": "failed",
    }
    assert not summary.ok
    assert await stored(engine, "eth_usd") == []
    assert len(await stored(engine, "btc_usd")) == 1
    assert sim.requests_for("no_such_index") == 1  # permanent: not retried
    assert sim.requests_for("eth_usd") == 3  # transient: retried HTTP_MAX_RETRIES times


async def test_the_same_slot_is_stored_once(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    settings = ingestion_settings(sim, db_url)
    slot = await roomy_slot()
    first = await ingest_tick(deribit, engine, settings, slot_ts=slot)
    await asyncio.sleep(1.1)  # a new observation time: only the slot can make it a duplicate
    second = await ingest_tick(deribit, engine, settings, slot_ts=slot)
    assert first.count("stored") == 3
    assert second.count("duplicate") == 3
    assert second.ok
    for ticker in TICKERS.split(","):
        assert len(await stored(engine, ticker)) == 1


async def test_tickers_are_fetched_concurrently(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    tickers = ["btc_usd", "eth_usd", "sol_usdc", "xrp_usdc", "ada_usdc", "dot_usdc"]
    # Each answer takes 200 ms: fetched one after another, no two would be in flight at once.
    sim.faults(latency_ms=200)
    settings = ingestion_settings(sim, db_url, tickers=",".join(tickers))
    summary = await ingest_tick(deribit, engine, settings, slot_ts=None)
    assert summary.count("stored") == len(tickers)
    assert sim.stats()["methods"]["public/get_index_price"]["max_in_flight"] == len(tickers)


@dataclass
class StoppableDatabase:
    server: ThrowawayPostgres
    url: str
    engine: AsyncEngine


@pytest.fixture
async def stoppable(throwaway_pg: ThrowawayPostgres) -> AsyncIterator[StoppableDatabase]:
    """A migrated database on a server the test may stop, and an engine on it."""
    url = await create_pg_database(throwaway_pg.url)
    database = StoppableDatabase(throwaway_pg, url, create_engine(url))
    yield database
    await database.engine.dispose()


async def test_prices_wait_for_the_database_and_keep_their_time(
    sim: SimServer, deribit: DeribitHttpClient, stoppable: StoppableDatabase
) -> None:
    engine = stoppable.engine
    settings = ingestion_settings(sim, stoppable.url, ingest_max_write_delay_seconds=60)
    stoppable.server.stop()
    slot = await roomy_slot()  # may wait for the next slot: the fetch time is taken after it
    fetched_at = int(time.time())
    with capture_logs() as logs:
        tick = asyncio.create_task(ingest_tick(deribit, engine, settings, slot_ts=slot))

        async def retrying_the_write() -> bool:
            return any(line["event"].startswith("database unavailable") for line in logs)

        await wait_until_async(retrying_the_write, 30, what="the write to wait for the database")
    assert not tick.done()  # still holding the prices, waiting for the database
    await asyncio.to_thread(stoppable.server.start)
    summary = await asyncio.wait_for(tick, 30)
    assert summary.count("stored") == 3
    for ticker in TICKERS.split(","):
        rows = await stored(engine, ticker)
        assert len(rows) == 1
        assert fetched_at - 1 <= rows[0].ts <= fetched_at + 2  # observation time, not write time


async def test_prices_older_than_the_bound_are_reported_failed(
    sim: SimServer, deribit: DeribitHttpClient, stoppable: StoppableDatabase
) -> None:
    stoppable.server.stop()
    settings = ingestion_settings(sim, stoppable.url, ingest_max_write_delay_seconds=2)
    with capture_logs() as logs:
        summary = await ingest_tick(deribit, stoppable.engine, settings, slot_ts=None)
    assert summary.count("failed") == 3
    assert all("database write failed" in (o.error or "") for o in summary.outcomes)
    lost = next(line for line in logs if line["event"] == "tick lost: database write failed")
    assert {row["ticker"] for row in lost["rows"]} == set(TICKERS.split(","))
    assert all(Decimal(row["price"]) > 0 for row in lost["rows"])


@pytest.mark.slow
def test_cli_ingest_prints_a_summary_and_exit_code(sim: SimServer, postgresql_url: str) -> None:
    env = {"DATABASE_URL": postgresql_url, "DERIBIT_RPC_URL": sim.rpc_url, "PATH": "/usr/bin:/bin"}

    def run(tickers: str) -> subprocess.CompletedProcess[str]:
        return launcher.run(
            crypto_client("ingest"),
            env={
                **env,
                "TICKERS": tickers,
                "HTTP_RETRY_BACKOFF_SECONDS": "0.01",
                "INGEST_INTERVAL_SECONDS": "86400",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )

    # A day-long slot with minutes left: a loaded machine can take seconds to start each
    # process, and neither tick may be late.
    roomy_slot_blocking(86400, room=120)
    ok = run("btc_usd,eth_usd")
    assert ok.returncode == 0, ok.stderr
    assert "btc_usd" in ok.stdout
    assert "stored" in ok.stdout

    failed = run("btc_usd,no_such_index")
    assert failed.returncode == 1
    line = next(line for line in failed.stdout.splitlines() if line.startswith("no_such_index"))
    assert "failed" in line
    assert "-32602" in line


async def test_deribit_down_for_whole_ticks_then_back(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    settings = ingestion_settings(sim, db_url, ingest_interval_seconds=1)
    sim.faults(outage=True)
    for _ in range(2):
        slot = await roomy_slot(1, room=0.7)
        down = await ingest_tick(deribit, engine, settings, slot_ts=slot)
        assert down.count("failed") == 3
        await asyncio.sleep(max(0.0, slot + 1 - time.time()))  # the next tick is a whole slot later
    sim.reset()
    back = await ingest_tick(deribit, engine, settings, slot_ts=await roomy_slot(1, room=0.7))
    assert back.count("stored") == 3
    for ticker in TICKERS.split(","):
        assert len(await stored(engine, ticker)) == 1
