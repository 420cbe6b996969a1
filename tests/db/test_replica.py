"""A real streaming replica (pg_basebackup -R) under the API: it serves what the primary's
writers stored, follows new rows through the primary's notifications, and /readyz reports
its lag."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from httpx_sse import aconnect_sse
from sqlalchemy.engine import make_url

from crypto_client.db.engine import create_engine
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from tests.support import local_http
from tests.support.databases import create_pg_database, plain_dsn
from tests.support.services import ApiServer, ThrowawayPostgres
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow


@pytest.fixture
def replica(throwaway_pg: ThrowawayPostgres) -> Iterator[ThrowawayPostgres]:
    server = throwaway_pg.replica()
    yield server
    server.destroy()


@pytest.fixture
async def primary_url(throwaway_pg: ThrowawayPostgres) -> str:
    return await create_pg_database(throwaway_pg.url)


@pytest.fixture
async def api(primary_url: str, replica: ThrowawayPostgres, tmp_path: Path) -> AsyncIterator[ApiServer]:
    replica_url = make_url(primary_url).set(port=replica.port).render_as_string(hide_password=False)
    env = {
        "DATABASE_URL": primary_url,
        "DATABASE_READ_URL": replica_url,
        "TICKERS": "btc_usd",
        "DATABASE_READ_MAX_LAG_SECONDS": "1",
        "API_LATEST_CACHE_SECONDS": "0",
    }
    # The replica has the database once it has replayed its creation.
    await wait_until_async(lambda: _answers(replica_url), 30, what="the database on the replica")
    with ApiServer.command("api", env, tmp_path) as server:
        yield server


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(plain_dsn(url), timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


async def store(primary_url: str, *prices: NewPrice) -> None:
    engine = create_engine(primary_url)
    try:
        async with write_transaction(engine) as writer:
            await writer.insert_many(list(prices))
    finally:
        await engine.dispose()


async def replay(replica: ThrowawayPostgres, database_url: str, *, paused: bool) -> None:
    dsn = plain_dsn(make_url(database_url).set(port=replica.port).render_as_string(hide_password=False))
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()"
        )
    finally:
        await connection.close()


async def test_the_api_reads_the_replica_and_readyz_reports_its_lag(
    api: ApiServer, primary_url: str, replica: ThrowawayPostgres
) -> None:
    now = int(time.time())
    await store(primary_url, NewPrice("btc_usd", Decimal("43521.37"), now))

    def served() -> list[int]:
        return [row["ts"] for row in api.get("/prices", ticker="btc_usd").json()]

    wait_until(lambda: served() == [now], 20, what="the primary's row served from the replica")
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["replication"].startswith("ok: ")

    await replay(replica, primary_url, paused=True)
    later = now + 1
    await store(primary_url, NewPrice("btc_usd", Decimal("43522"), later))
    lagging = wait_until(
        lambda: (answer := api.get("/readyz")).status_code == 503 and answer, 20, what="/readyz lagging"
    )
    assert isinstance(lagging, httpx.Response)
    assert "lagging (more than 1 s)" in lagging.json()["replication"], lagging.text
    assert served() == [now]  # the API reads the replica, which has not replayed the new row

    await replay(replica, primary_url, paused=False)
    wait_until(lambda: served() == [now, later], 20, what="the row once replayed")
    wait_until(lambda: api.get("/readyz").status_code == 200, 20, what="/readyz ready again")


async def test_the_stream_follows_the_primarys_notifications_with_rows_from_the_replica(
    api: ApiServer, primary_url: str
) -> None:
    first_ts = int(time.time())
    await store(primary_url, NewPrice("btc_usd", Decimal("2291.40"), first_ts))
    wait_until(lambda: api.get("/prices", ticker="btc_usd").json(), 20, what="the first row on the replica")
    params, resume = {"ticker": "btc_usd"}, {"Last-Event-ID": "0"}
    async with (
        local_http.async_client(timeout=20) as client,
        aconnect_sse(client, "GET", api.url + "/prices/stream", params=params, headers=resume) as source,
    ):
        events = source.aiter_sse()

        async def next_price() -> dict[str, object]:
            async with asyncio.timeout(20):
                async for event in events:
                    if event.event == "price":
                        found: dict[str, object] = json.loads(event.data)
                        return found
            raise AssertionError("the stream ended")

        # The resumed row says the subscription is live; the next arrives by notification.
        assert (await next_price())["ts"] == first_ts
        await store(primary_url, NewPrice("btc_usd", Decimal("2291.5"), first_ts + 1))
        assert await next_price() == {
            "ticker": "btc_usd",
            "price": 2291.5,
            "ts": first_ts + 1,
            "source": "poll",
        }
