"""`/prices/stream`: stored rows reach Server-Sent Events clients, across processes, with
resume by `Last-Event-ID`, slow clients dropped, and a server that still stops promptly."""

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db.changes import stored_signal
from crypto_client.db.writer import PriceWriter, write_transaction
from crypto_client.domain import NewPrice
from tests.support import local_http
from tests.support.services import ApiServer
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow

BASE_TS = 1_767_225_600  # 2026-01-01


@pytest.fixture
def api(db_url: str, engine: AsyncEngine, tmp_path: Path) -> Iterator[ApiServer]:
    env = {"DATABASE_URL": db_url, "TICKERS": "btc_usd,eth_usd", "LOG_FORMAT": "json"}
    with ApiServer.command("api", env, tmp_path) as server:
        yield server


async def store(engine: AsyncEngine, ticker: str, *timestamps: int) -> None:
    async with write_transaction(engine) as writer:
        prices = [NewPrice(ticker, Decimal(f"{ts - BASE_TS}.25"), ts, None, "poll") for ts in timestamps]
        assert len(await writer.insert_many(prices)) == len(prices)


class Listener:
    """An SSE client collecting events in the background."""

    def __init__(self) -> None:
        self.events: list[ServerSentEvent] = []
        self.opened = asyncio.Event()

    def rows(self) -> list[tuple[str, int]]:
        return [(data["ticker"], data["ts"]) for data in (json.loads(e.data) for e in self.events)]

    async def has(self, count: int) -> None:
        async def enough() -> bool:
            return len(self.events) >= count

        await wait_until_async(enough, 15, what=f"{count} events")


@asynccontextmanager
async def listening(url: str, *, last_event_id: str | None = None, **params: str) -> AsyncIterator[Listener]:
    listener = Listener()
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}

    async def run() -> None:
        async with (
            local_http.async_client(timeout=httpx.Timeout(10, read=None)) as client,
            aconnect_sse(client, "GET", url + "/prices/stream", params=params, headers=headers) as source,
        ):
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            listener.opened.set()
            async for event in source.aiter_sse():
                if event.event != "message":  # httpx-sse's empty event for a keep-alive comment
                    listener.events.append(event)

    task = asyncio.create_task(run())
    try:
        await wait_until_async(lambda: _opened(listener, task), 10, what="the stream to open")
        yield listener
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _opened(listener: Listener, task: "asyncio.Task[None]") -> bool:
    if task.done():
        task.result()  # raises what went wrong
    return listener.opened.is_set()


PROBE_TS = BASE_TS + 10_000_000  # far from every timestamp the tests store


async def until_live(listener: Listener, engine: AsyncEngine, ticker: str) -> None:
    """Wait until the server's subscription for `listener` exists (the response headers come
    before it): probe rows are stored until one arrives, then a last one fences off the rest
    (events come in `seq` order), and the probes are forgotten."""
    probes = iter(range(PROBE_TS, PROBE_TS + 100_000))

    async def a_probe_arrived() -> bool:
        if listener.events:
            return True
        await store(engine, ticker, next(probes))
        return False

    await wait_until_async(a_probe_arrived, 10, what="the server's subscription")
    fence = next(probes)
    await store(engine, ticker, fence)
    await wait_until_async(lambda: asyncio.sleep(0, (ticker, fence) in listener.rows()), 10, what="the fence")
    assert all(ts >= PROBE_TS for _, ts in listener.rows())
    listener.events.clear()


async def test_stored_rows_reach_clients_and_a_resumed_client_loses_nothing(
    api: ApiServer, engine: AsyncEngine
) -> None:
    async with listening(api.url, ticker="btc_usd") as first:
        await until_live(first, engine, "btc_usd")
        await store(engine, "btc_usd", BASE_TS, BASE_TS + 60)
        await store(engine, "eth_usd", BASE_TS)  # not asked for
        await store(engine, "btc_usd", BASE_TS + 120)
        # Events come in seq order: once this one is in, any extra or repeated one would be too.
        await store(engine, "btc_usd", BASE_TS + 150)
        await first.has(4)
    assert first.rows() == [
        ("btc_usd", BASE_TS),
        ("btc_usd", BASE_TS + 60),
        ("btc_usd", BASE_TS + 120),
        ("btc_usd", BASE_TS + 150),
    ]
    assert all(event.event == "price" for event in first.events)
    assert json.loads(first.events[0].data) == {
        "ticker": "btc_usd",
        "price": 0.25,
        "ts": BASE_TS,
        "source": "poll",
    }
    assert '"price":60.25' in first.events[1].data  # exact decimal text, as /prices sends it
    ids = [int(event.id) for event in first.events]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4

    # Disconnected: rows keep coming, one of them older than the rest (a back-fill).
    await store(engine, "btc_usd", BASE_TS + 180)
    await store(engine, "btc_usd", BASE_TS - 60, BASE_TS + 240)
    async with listening(api.url, last_event_id=first.events[-1].id, ticker="btc_usd") as resumed:
        await resumed.has(3)
        await store(engine, "btc_usd", BASE_TS + 300)
        await store(engine, "btc_usd", BASE_TS + 330)  # the fence, as above
        await resumed.has(5)
    assert resumed.rows() == [
        ("btc_usd", BASE_TS + 180),
        ("btc_usd", BASE_TS - 60),
        ("btc_usd", BASE_TS + 240),
        ("btc_usd", BASE_TS + 300),
        ("btc_usd", BASE_TS + 330),
    ]
    resumed_ids = [int(event.id) for event in resumed.events]
    assert resumed_ids == sorted(resumed_ids)
    assert resumed_ids[0] > ids[-1]


async def test_every_configured_ticker_by_default_and_bad_requests_are_refused(
    api: ApiServer, engine: AsyncEngine
) -> None:
    async with listening(api.url) as everything:
        await until_live(everything, engine, "btc_usd")
        await store(engine, "eth_usd", BASE_TS)
        await store(engine, "btc_usd", BASE_TS)
        await everything.has(2)
    assert sorted(everything.rows()) == [("btc_usd", BASE_TS), ("eth_usd", BASE_TS)]

    unknown = api.get("/prices/stream", ticker="nope_usd")
    assert unknown.status_code == 404
    assert "nope_usd" in unknown.json()["detail"]
    assert "Traceback" not in api.output


def test_a_last_event_id_that_is_no_id_of_the_stream_is_a_400(api: ApiServer) -> None:
    garbage = [
        "abc",
        "-1",
        "+5",
        "1.0",
        "1e3",
        "0x10",
        "5 s",
        "1 2",
        "12345678901234567890",
        "9223372036854775808",
    ]
    for last_event_id in garbage:
        response = local_http.get(
            api.url + "/prices/stream", headers={"Last-Event-ID": last_event_id}, timeout=5
        )
        assert response.status_code == 400, (last_event_id, response.text)
        detail = response.json()["detail"]
        assert "Last-Event-ID" in detail
        assert last_event_id in detail
    assert "Traceback" not in api.output


async def test_a_resume_point_beyond_the_newest_row_restarts_the_client_there_and_says_so(
    api: ApiServer, engine: AsyncEngine
) -> None:
    """After a restore (or another database behind the API) a client's last id can lie beyond
    every stored row: it is told, and then gets the rows stored from then on."""
    await store(engine, "btc_usd", BASE_TS, BASE_TS + 60)
    async with listening(api.url, ticker="btc_usd") as first:
        await store(engine, "btc_usd", BASE_TS + 120)
        await first.has(1)
    newest = int(first.events[-1].id)

    async with listening(api.url, last_event_id=str(newest + 1000), ticker="btc_usd") as ahead:
        await ahead.has(1)
        reset = ahead.events[0]
        assert reset.event == "reset"
        assert reset.id == str(newest)  # an EventSource resumes from here if it reconnects
        assert json.loads(reset.data)["newest_seq"] == newest
        assert json.loads(reset.data)["last_event_id"] == newest + 1000
        await store(engine, "btc_usd", BASE_TS + 180)
        await ahead.has(2)
    assert ahead.events[1].event == "price"
    assert json.loads(ahead.events[1].data)["ts"] == BASE_TS + 180
    assert int(ahead.events[1].id) > newest
    assert len(ahead.events) == 2


async def test_writes_of_another_process_wake_listeners_through_postgres(postgresql_url: str) -> None:
    """NOTIFY is sent by the writing transaction itself: a writer that is not this process's
    (here: one that skips the local announcement) still wakes the listener."""
    from crypto_client.db.engine import create_engine

    engine = create_engine(postgresql_url)
    try:
        async with stored_signal(postgresql_url) as stored:
            for attempt in range(20):  # until the listener's connection is up
                async with engine.begin() as connection:
                    await PriceWriter(connection).insert_many(
                        [NewPrice("btc_usd", Decimal("1"), BASE_TS - 86_400 + attempt, None, "poll")]
                    )
                try:
                    await asyncio.wait_for(stored.wait(), 0.5)
                    break
                except TimeoutError:
                    continue
            assert stored.is_set()
    finally:
        await engine.dispose()


async def test_writers_commit_in_seq_order_on_postgres(postgresql_url: str) -> None:
    """A transaction that took a smaller seq commits first: the next writer waits for it."""
    from crypto_client.db.engine import create_engine
    from crypto_client.db.reader import PriceReader

    engine = create_engine(postgresql_url)
    try:
        async with engine.connect() as first_connection:
            transaction = await first_connection.begin()
            await PriceWriter(first_connection).insert_many(
                [NewPrice("eth_usd", Decimal("1"), BASE_TS - 7, None)]
            )
            second = asyncio.create_task(store(engine, "eth_usd", BASE_TS - 8))
            await wait_until_async(
                lambda: a_writer_waits_for_a_lock(engine), 10, what="the second writer to wait"
            )
            assert not second.done()  # waiting for the first writer's commit
            await transaction.commit()
            await asyncio.wait_for(second, 5)
        async with engine.connect() as connection:
            rows = await PriceReader(connection).stored_after(0, ["eth_usd"], limit=100)
    finally:
        await engine.dispose()
    order = [stored.row.ts for stored in rows if stored.row.ts in (BASE_TS - 7, BASE_TS - 8)]
    assert order == [BASE_TS - 7, BASE_TS - 8]


async def a_writer_waits_for_a_lock(engine: AsyncEngine) -> bool:
    """A backend of this database is blocked on a lock (the writers' advisory lock). A new
    connection each time: pg_stat_activity is a snapshot for the rest of a transaction."""
    async with engine.connect() as observer:
        waiting = await observer.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def until_subscribed(client: socket.socket, engine: AsyncEngine, ticker: str) -> None:
    """`until_live` for a raw socket: probe rows until one is read; the client reads no more."""
    client.setblocking(False)
    received = bytearray()
    probes = iter(range(PROBE_TS, PROBE_TS + 100_000))

    async def a_probe_arrived() -> bool:
        with contextlib.suppress(BlockingIOError):
            received.extend(client.recv(65536))
        if b"event: price" in received:
            return True
        await store(engine, ticker, next(probes))
        return False

    await wait_until_async(a_probe_arrived, 10, what="the raw client's subscription")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_client_that_never_reads_is_dropped_without_growing_memory(
    api: ApiServer, engine: AsyncEngine
) -> None:
    server = psutil.Process(api.process.popen.pid)
    stalled = socket.create_connection(("127.0.0.1", api.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /prices/stream?ticker=btc_usd HTTP/1.1\r\nHost: test\r\n\r\n")
    try:
        await until_subscribed(stalled, engine, "btc_usd")
        async with listening(api.url, ticker="eth_usd") as healthy:
            await until_live(healthy, engine, "eth_usd")
            rss_before = server.memory_info().rss
            for batch in range(40):
                first = BASE_TS + batch * 1000
                await store(engine, "btc_usd", *range(first, first + 1000))
            await store(engine, "eth_usd", BASE_TS)
            await healthy.has(1)
            wait_until(lambda: "stream client dropped" in api.output, 20, what="the slow client dropped")
            rss_after = server.memory_info().rss
    finally:
        stalled.close()
    # 40,000 events of about 100 bytes: 4 MB if they were all kept for the stalled client.
    assert rss_after - rss_before < 3_000_000, (rss_before, rss_after)
    assert healthy.rows() == [("eth_usd", BASE_TS)]
    assert api.get("/health").status_code == 200


def test_the_server_stops_promptly_with_streams_open(api: ApiServer) -> None:
    with local_http.stream("GET", api.url + "/prices/stream", timeout=10) as response:
        assert response.status_code == 200
        api.process.popen.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        assert api.process.popen.wait(10) == 0
    assert time.monotonic() - stopped < 3
    assert "api stopped" in api.output
