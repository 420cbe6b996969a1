"""PostgreSQL stopped for ~30 s under a running deployment: the API reports it and recovers
without a restart; ingestion keeps every fetched price and stores each slot exactly once."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.celery_stack import TICKERS, CeleryStack
from tests.support.databases import create_pg_database
from tests.support.services import ApiServer, SimServer, ThrowawayPostgres, ThrowawayRedis
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 30
INTERVAL = 6


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


async def test_database_outage_loses_and_duplicates_nothing(
    stack: CeleryStack, throwaway_pg: ThrowawayPostgres
) -> None:
    api = await asyncio.to_thread(ApiServer.command, "api", stack.env, stack.tmp)
    stack.processes.append(api.process)
    health = f"{api.url}/health"
    await asyncio.to_thread(wait_until, lambda: httpx.get(health).status_code == 200, 30, what="API")

    # Enough pool processes that ticks keep being fetched while earlier ones wait for the database.
    stack.worker(concurrency=OUTAGE_SECONDS // INTERVAL + 2)
    stack.beat()
    await asyncio.to_thread(wait_until, lambda: asyncio.run(stack.rows()), 30, what="first rows")

    await asyncio.to_thread(throwaway_pg.stop)
    outage_started = time.time()
    statuses = []
    while time.time() - outage_started < OUTAGE_SECONDS:
        statuses.append(httpx.get(health, timeout=5).status_code)
        await asyncio.sleep(2)
    await asyncio.to_thread(throwaway_pg.start)
    outage_ended = time.time()

    assert set(statuses) == {503}
    await asyncio.to_thread(
        wait_until, lambda: httpx.get(health).status_code == 200, 10, what="API health back"
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
