"""`Retry-After` honoured against a real API whose database is down, and a stream that
resumes across the API's restart."""

import asyncio
import datetime
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import BASE_TS, api_env, store
from crypto_client_sdk import AsyncClient, Client, NotFound, Price, RetryPolicy, Unavailable
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.engine import create_engine
from tests.conftest import throwaway_pg
from tests.support.databases import create_pg_database
from tests.support.services import ApiServer, ThrowawayPostgres, crypto_client
from tests.support.waiting import wait_until

__all__ = ["throwaway_pg"]

pytestmark = pytest.mark.slow

# Retries this quick would come ~10 ms apart: only honouring Retry-After spaces them by seconds.
QUICK = RetryPolicy(max_retries=2, backoff_seconds=0.01, max_backoff_seconds=0.01)


def answers(api: ApiServer, path: str) -> list[tuple[int, datetime.datetime]]:
    """(status, when) of every request the API logged for `path`."""
    found = []
    for line in api.output.splitlines():
        if line.startswith("{") and '"event": "request"' in line:
            entry = json.loads(line)
            if entry["path"] == path:
                found.append((entry["status"], datetime.datetime.fromisoformat(entry["timestamp"])))
    return found


def logged(
    api: ApiServer, path: str, enough: Callable[[list[tuple[int, datetime.datetime]]], bool]
) -> list[tuple[int, datetime.datetime]]:
    """`answers` once they are `enough`: the API logs a request after it has answered it, so
    the client may have the answer before the line is written."""

    def found() -> list[tuple[int, datetime.datetime]] | None:
        entries = answers(api, path)
        return entries if enough(entries) else None

    entries = wait_until(found, 10, what=f"the API's log of {path}")
    assert entries is not None
    return entries


class Outage:
    def __init__(self, server: ThrowawayPostgres, api: ApiServer, engine: AsyncEngine) -> None:
        self.server, self.api, self.engine = server, api, engine


@pytest.fixture
async def outage(throwaway_pg: ThrowawayPostgres, tmp_path: Path) -> AsyncIterator[Outage]:
    url = await create_pg_database(throwaway_pg.url)
    engine = create_engine(url)
    api = await asyncio.to_thread(ApiServer.command, "api", api_env(url), tmp_path)
    yield Outage(throwaway_pg, api, engine)
    api.stop()
    await engine.dispose()


async def test_a_503_is_retried_after_its_retry_after_then_raised(outage: Outage) -> None:
    await store(outage.engine, [("btc_usd", "2291.40", BASE_TS)])
    await outage.engine.dispose()
    await asyncio.to_thread(outage.server.stop)
    started = time.monotonic()
    with Client(outage.api.url, retry=QUICK) as client, pytest.raises(Unavailable) as raised:
        list(client.prices("btc_usd"))
    elapsed = time.monotonic() - started
    assert raised.value.status == 503
    assert raised.value.retry_after == 1.0
    assert raised.value.detail == "the database is unavailable, try again shortly"
    refused = logged(outage.api, "/prices/range", lambda found: len(found) >= 3)
    assert [status for status, _ in refused] == [503, 503, 503]  # the call and its 2 retries
    spacing = [(later - earlier).total_seconds() for (_, earlier), (_, later) in itertools.pairwise(refused)]
    assert min(spacing) >= 0.95, spacing
    assert elapsed >= 2.0


async def test_a_call_waiting_out_an_outage_gets_every_row(outage: Outage) -> None:
    await store(outage.engine, [("btc_usd", f"{i}.10", BASE_TS + 60 * i) for i in range(50)])
    await outage.engine.dispose()
    await asyncio.to_thread(outage.server.stop)
    result: list[Price] = []
    patient = RetryPolicy(max_retries=60, backoff_seconds=0.01)

    def walk() -> None:
        with Client(outage.api.url, retry=patient, page_size=20) as client:
            result.extend(client.prices("btc_usd"))

    walker = threading.Thread(target=walk)
    walker.start()
    await asyncio.to_thread(
        wait_until, lambda: len(answers(outage.api, "/prices/range")) >= 2, 20, what="two refused calls"
    )
    await asyncio.to_thread(outage.server.start)
    await asyncio.to_thread(walker.join, 60)
    assert not walker.is_alive()
    assert [(p.price, p.ts) for p in result] == [(Decimal(f"{i}.10"), BASE_TS + 60 * i) for i in range(50)]
    answered = logged(outage.api, "/prices/range", lambda found: [s for s, _ in found].count(200) >= 3)
    statuses = [status for status, _ in answered]
    assert statuses[0] == 503
    # Three pages, each answered once; a pooled connection the restart broke may cost one
    # more 503 after the first success, and that is retried too.
    assert statuses.count(200) == 3
    assert set(statuses) == {200, 503}


async def test_the_stream_resumes_across_an_api_restart_delivering_every_row_once(
    postgresql_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    api = await asyncio.to_thread(ApiServer.command, "api", api_env(postgresql_url), tmp_path)
    port = api.port
    expected = [("btc_usd", BASE_TS + 60 * i) for i in range(15)]
    got: list[Price] = []
    reconnecting = RetryPolicy(backoff_seconds=0.05, max_backoff_seconds=0.5)

    def listen() -> None:
        with Client(api.url, retry=reconnecting) as client:
            for price in client.stream(["btc_usd"], last_event_id=0):
                got.append(price)
                if len(got) >= len(expected):
                    return

    listener = threading.Thread(target=listen, daemon=True)
    try:
        await store(engine, [("btc_usd", f"{ts}.5", ts) for _, ts in expected[:5]])
        listener.start()
        await asyncio.to_thread(wait_until, lambda: len(got) == 5, 20, what="the first rows")
        await asyncio.to_thread(api.stop)
        # Stored while no server runs, one of them a ticker not asked for.
        await store(engine, [("btc_usd", f"{ts}.5", ts) for _, ts in expected[5:10]])
        await store(engine, [("eth_usd", "1", BASE_TS)])
        args = crypto_client("api", "--port", str(port))
        api = await asyncio.to_thread(
            ApiServer, args, api_env(postgresql_url), tmp_path / f"api-{port}-again.log", port=port
        )
        await store(engine, [("btc_usd", f"{ts}.5", ts) for _, ts in expected[10:]])
        await asyncio.to_thread(listener.join, 30)
        assert not listener.is_alive()
    finally:
        api.stop()
    assert [(p.ticker, p.ts) for p in got] == expected
    assert all(p.price == Decimal(f"{p.ts}.5") for p in got)
    ids = [p.event_id for p in got if p.event_id is not None]
    assert len(ids) == len(got)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_the_stream_raises_not_found_for_an_unknown_ticker(api: ApiServer) -> None:
    with Client(api.url) as client, pytest.raises(NotFound, match="unknown ticker 'doge_usd'"):
        next(client.stream("doge_usd"))


async def test_the_async_stream_yields_stored_rows_and_resumes_after_an_event_id(
    api: ApiServer, engine: AsyncEngine
) -> None:
    await store(engine, [("btc_usd", f"{i}.75", BASE_TS + 60 * i) for i in range(3)])
    async with AsyncClient(api.url) as client:

        async def take(count: int, last_event_id: int | None) -> list[Price]:
            taken: list[Price] = []
            async for price in client.stream(["btc_usd"], last_event_id=last_event_id):
                taken.append(price)
                if len(taken) == count:
                    return taken
            raise AssertionError("the stream ended")

        first = await asyncio.wait_for(take(3, 0), 20)
        resumed = asyncio.create_task(take(2, first[1].event_id))
        await store(engine, [("btc_usd", "3.75", BASE_TS + 180)])
        rest = await asyncio.wait_for(resumed, 20)
    assert [(p.ts, p.price) for p in first] == [(BASE_TS + 60 * i, Decimal(f"{i}.75")) for i in range(3)]
    assert [p.ts for p in rest] == [BASE_TS + 120, BASE_TS + 180]
    assert rest[0] == first[2]  # the same row, the same event
    assert rest[0].event_id == first[2].event_id
