"""PostgreSQL stopped for ~15 s under a running deployment: the API reports it and recovers
without a restart; ingestion keeps every fetched price and stores each slot exactly once."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.embedded_scheduler import IntervalScheduler
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.tick import TickSummary
from tests.support import local_http
from tests.support.celery_stack import TICKERS, CeleryStack
from tests.support.databases import create_pg_database
from tests.support.services import ApiServer, SimServer, ThrowawayPostgres, ThrowawayRedis
from tests.support.settings import ingestion_settings
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 15
INTERVAL = 3


@pytest.fixture
async def stack(
    sim: SimServer, redis_server: ThrowawayRedis, throwaway_pg: ThrowawayPostgres, tmp_path: Path
) -> AsyncIterator[CeleryStack]:
    db_url = await create_pg_database(throwaway_pg.url)
    stack = CeleryStack(
        tmp=tmp_path,
        sim=sim,
        db_url=db_url,
        broker_url=redis_server.url,
        interval=INTERVAL,
        extra_env={"INGEST_MAX_WRITE_DELAY_SECONDS": "120", "CELERY_VISIBILITY_TIMEOUT_SECONDS": "300"},
    )
    yield stack
    stack.stop_all()


@pytest.mark.long
async def test_database_outage_loses_and_duplicates_nothing(
    stack: CeleryStack, throwaway_pg: ThrowawayPostgres
) -> None:
    api = await asyncio.to_thread(ApiServer.command, "api", stack.env, stack.tmp)
    stack.processes.append(api.process)
    health = f"{api.url}/health"
    await asyncio.to_thread(wait_until, lambda: local_http.get(health).status_code == 200, 30, what="API")

    # Enough pool processes that ticks keep being fetched while earlier ones wait for the database.
    stack.worker(concurrency=OUTAGE_SECONDS // INTERVAL + 2)
    stack.beat()
    await asyncio.to_thread(wait_until, lambda: asyncio.run(stack.rows()), 30, what="first rows")

    await asyncio.to_thread(throwaway_pg.stop)
    outage_started = time.time()
    statuses = []
    while time.time() - outage_started < OUTAGE_SECONDS:
        statuses.append(local_http.get(health, timeout=5).status_code)
        await asyncio.sleep(2)
    await asyncio.to_thread(throwaway_pg.start)
    outage_ended = time.time()

    assert set(statuses) == {503}
    await asyncio.to_thread(
        wait_until, lambda: local_http.get(health).status_code == 200, 10, what="API health back"
    )

    # Wait for the ticks held during the outage to land, plus two fresh ticks.
    deadline = time.monotonic() + 60
    while True:
        rows = await stack.rows()
        if any(ts > outage_ended + 2 * INTERVAL for _, ts, _ in rows) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)

    slots = sorted({slot for _, _, slot in rows if slot is not None})
    expected = list(range(slots[0], slots[-1] + INTERVAL, INTERVAL))
    during = [slot for slot in expected if outage_started <= slot <= outage_ended - INTERVAL]
    assert len(during) >= OUTAGE_SECONDS // INTERVAL - 1
    for ticker in TICKERS:
        ticker_slots = [slot for t, _, slot in rows if t == ticker]
        assert ticker_slots == expected, f"{ticker}: gaps or duplicates around the outage"
    for _, ts, slot in rows:
        assert slot is not None
        assert slot <= ts < slot + INTERVAL, "stored with the time it was written, not observed"
    assert "database unavailable, keeping the tick and retrying" in stack.processes[1].output


async def test_prices_held_through_an_outage_win_their_slots_over_the_repair(
    sim: SimServer, throwaway_pg: ThrowawayPostgres
) -> None:
    """The embedded scheduler ticks 1 s slots through a database outage, holding the prices;
    the repair runs the moment the database is back, before the held writes retry. The
    observed prices must be what is stored, not Deribit's history of the same slots."""
    db_url = await create_pg_database(throwaway_pg.url)
    settings = ingestion_settings(
        sim,
        db_url,
        tickers="btc_usd",
        ingest_interval_seconds=1,
        ingest_max_write_delay_seconds=60,
        deribit_max_retries=0,
        deribit_timeout_seconds=2,
    )
    started: list[int] = []
    finished: dict[int, TickSummary] = {}
    engine = create_engine(db_url, pool_size=2)
    try:
        async with DeribitHttpClient(sim.rpc_url, timeout=2, max_retries=0) as client:
            runtime = IngestionRuntime(settings, engine, client, client)

            async def tick(slot: int) -> TickSummary:
                started.append(slot)
                finished[slot] = await runtime.run_tick(slot)
                return finished[slot]

            scheduler = IntervalScheduler(1, tick)
            scheduler.start()
            try:
                await wait_until_async(lambda: slots_by_source(engine), 15, what="first rows")
                await asyncio.to_thread(throwaway_pg.stop)
                outage_started = time.time()
                while time.time() - outage_started < 8:  # slots observed and held in memory
                    await asyncio.sleep(0.5)
                await asyncio.to_thread(throwaway_pg.start)
                outage_ended = time.time()
                reports = await runtime.repair_recent()
                assert reports is not None
                assert [report.ticker for report in reports] == list(settings.tickers), reports
                assert all(report.ok for report in reports), reports
                held = [slot for slot in started if outage_started <= slot < outage_ended - 1]

                async def held_ticks_finished() -> bool:
                    return all(slot in finished for slot in held)

                await wait_until_async(held_ticks_finished, 30, interval=0.5, what="the held ticks")
            finally:
                await scheduler.stop()
        stored = await slots_by_source(engine)
    finally:
        await engine.dispose()
    outcomes = {slot: finished[slot].outcomes[0] for slot in held}
    kept = [slot for slot, outcome in outcomes.items() if outcome.reason != "late"]
    assert len(kept) >= 5, outcomes
    assert {outcomes[slot].status for slot in kept} == {"stored"}, "a held price was refused"
    assert {stored[slot] for slot in kept} == {"poll"}, "history took slots whose prices were held"


async def slots_by_source(engine: AsyncEngine) -> dict[int, str]:
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT slot_ts, source FROM price_ticks WHERE ticker = 'btc_usd'")
        )
        return {int(slot): str(source) for slot, source in result}
