"""Deribit's WebSocket price stream against the simulator's, over a real WebSocket: prices,
heartbeats, drops, stalls, refusals and garbage."""

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import Observation
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.clock import SourceClock
from tests.conftest import empty_database
from tests.support.services import ApiServer, Process, SimServer, crypto_client
from tests.support.waiting import wait_until, wait_until_async


@dataclass
class Received:
    observations: list[Observation] = field(default_factory=list)

    async def add(self, observation: Observation) -> None:
        self.observations.append(observation)

    def of(self, ticker: str) -> list[Observation]:
        return [o for o in self.observations if o.ticker == ticker]

    async def more_than(self, count: int, ticker: str = "btc_usd", timeout: float = 10) -> None:
        async def enough() -> bool:
            return len(self.of(ticker)) > count

        await wait_until_async(enough, timeout, what=f"more than {count} notifications of {ticker}")


@dataclass
class Running:
    stream: DeribitStream
    received: Received
    task: "asyncio.Task[None]"


@pytest.fixture
async def fast_sim(sim: SimServer) -> SimServer:
    sim.faults(stream_interval_ms=100, heartbeat_scale=0.1)  # heartbeats every second
    return sim


@asynccontextmanager
async def start(sim: SimServer, tickers: list[str], **options: float) -> AsyncIterator[Running]:
    stream = DeribitStream(sim.ws_url, backoff_seconds=0.05, **options)  # type: ignore[arg-type]
    received = Received()
    task = asyncio.create_task(stream.run(tickers, received.add))
    try:
        yield Running(stream, received, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def running(fast_sim: SimServer) -> AsyncIterator[Running]:
    async with start(fast_sim, ["btc_usd", "eth_usd"], stall_seconds=3) as each:
        yield each


async def test_prices_arrive_exact_and_on_deribits_clock(fast_sim: SimServer, running: Running) -> None:
    fast_sim.pin(btc_usd="43521.37")
    await running.received.more_than(3)
    await running.received.more_than(1, "eth_usd")
    pinned = [o for o in running.received.of("btc_usd") if o.price == Decimal("43521.37")]
    assert pinned
    assert str(pinned[-1].price) == "43521.37"
    clock = SourceClock()
    for observation in running.received.observations[-5:]:
        timing = clock.time_of(observation)
        assert timing.clock == "source"
        assert abs(timing.ts - time.time()) < 3


async def test_test_requests_are_answered_so_the_connection_lives(running: Running) -> None:
    await running.stream.connected.wait()
    count = len(running.received.observations)
    await asyncio.sleep(3.5)  # three heartbeat periods: an unanswered test_request closes it
    assert running.stream.reconnects == 0
    assert len(running.received.observations) > count + 20


async def test_a_dropped_connection_is_reconnected_and_resubscribed(
    fast_sim: SimServer, running: Running
) -> None:
    await running.received.more_than(2)
    with capture_logs() as logs:
        fast_sim.faults(ws_disconnects=1)

        async def reconnected() -> bool:
            return running.stream.reconnects >= 1 and running.stream.connected.is_set()

        await wait_until_async(reconnected, 10, what="a reconnect")
        before = len(running.received.of("btc_usd"))
        await running.received.more_than(before)
    assert any(line["event"] == "price stream disconnected, reconnecting" for line in logs)


async def test_a_silent_connection_trips_the_watchdog(fast_sim: SimServer) -> None:
    async with start(fast_sim, ["btc_usd"], stall_seconds=1) as running:
        await running.received.more_than(2)
        with capture_logs() as logs:
            fast_sim.faults(ws_stall=True)

            async def watchdog_fired() -> bool:
                return any("StreamStalledError" in str(line.get("cause")) for line in logs)

            await wait_until_async(watchdog_fired, 10, what="the watchdog")
        fast_sim.faults(ws_stall=False)
        before = len(running.received.of("btc_usd"))
        await running.received.more_than(before, timeout=15)


async def test_refused_channels_are_reported(fast_sim: SimServer) -> None:
    fast_sim.faults(ws_drop_channels=["deribit_price_index.eth_usd"])
    with capture_logs() as logs:
        async with start(fast_sim, ["btc_usd", "eth_usd", "no_such_index"], stall_seconds=3) as running:
            await running.received.more_than(2)
    refused = next(line for line in logs if line["event"] == "price stream channels refused")
    assert refused["channels"] == ["deribit_price_index.eth_usd", "deribit_price_index.no_such_index"]
    assert not running.received.of("eth_usd")


async def test_refused_connections_are_retried_until_accepted(fast_sim: SimServer) -> None:
    fast_sim.faults(ws_refuse=True)
    async with start(fast_sim, ["btc_usd"], stall_seconds=3) as running:

        async def retried() -> bool:
            return running.stream.reconnects >= 3

        await wait_until_async(retried, 10, what="retries")
        assert not running.received.observations
        fast_sim.faults(ws_refuse=False)
        await running.received.more_than(1, timeout=15)


async def test_a_malformed_frame_is_skipped(fast_sim: SimServer, running: Running) -> None:
    await running.received.more_than(1)
    with capture_logs() as logs:
        fast_sim.faults(ws_malformed_next=2)
        before = len(running.received.observations)
        await running.received.more_than(len(running.received.of("btc_usd")) + 3)
    assert any("malformed" in line["event"] for line in logs)
    assert running.stream.reconnects == 0
    assert len(running.received.observations) > before


async def test_the_stream_command_stores_one_row_per_ticker_per_slot(
    sim: SimServer, postgresql_url: str, tmp_path: Path
) -> None:
    sim.faults(stream_interval_ms=200)
    await empty_database(postgresql_url)
    engine = create_engine(postgresql_url)
    env = {
        "DATABASE_URL": postgresql_url,
        "DERIBIT_WS_URL": sim.ws_url,
        "TICKERS": "btc_usd,eth_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "json",
    }
    # Two consumers at once still give one row per slot.
    consumers = [Process(crypto_client("stream"), env, tmp_path / f"stream-{n}.log") for n in (1, 2)]
    try:

        async def rows() -> list[tuple[str, int, int, str]]:
            async with engine.connect() as connection:
                result = await connection.execute(text("SELECT ticker, ts, slot_ts, source FROM price_ticks"))
                return [(t, ts, slot, source) for t, ts, slot, source in result]

        async def enough() -> bool:
            return sum(1 for row in await rows() if row[0] == "eth_usd") >= 4

        await wait_until_async(enough, 30, what="streamed rows")
        for consumer in consumers:
            consumer.popen.send_signal(signal.SIGINT)
            assert consumer.popen.wait(10) == 0
    finally:
        for consumer in consumers:
            consumer.stop()
    stored = await rows()
    await engine.dispose()
    assert {source for *_, source in stored} == {"stream"}
    slots = [(ticker, slot) for ticker, _, slot, _ in stored]
    assert len(slots) == len(set(slots))
    assert all(slot <= ts < slot + 1 for _, ts, slot, _ in stored)
    assert all("Traceback" not in consumer.output for consumer in consumers)


def test_polling_fills_the_slots_while_the_stream_is_out_and_the_reverse(
    sim: SimServer, tmp_path: Path
) -> None:
    """`serve` with the stream on: each source covers the other's outage, one row per slot."""
    database = tmp_path / "both.db"
    env = {
        "DATABASE_URL": f"sqlite:///{database}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "DERIBIT_WS_URL": sim.ws_url,
        "STREAM_ENABLED": "true",
        "TICKERS": "btc_usd,eth_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "BACKFILL_INTERVAL_SECONDS": "0",  # no third source: the gaps are the two sources' own
        "LOG_FORMAT": "json",
    }
    sim.faults(outage=True, stream_interval_ms=100)  # polling fails: the stream alone stores
    server = ApiServer.command("serve", env, tmp_path, ready_path="/health")
    try:

        def count(source: str) -> int:
            rows = server.get("/prices", ticker="eth_usd", limit=1000).json()
            return sum(1 for row in rows if row["source"] == source)

        wait_until(lambda: count("stream") >= 3, 20, what="streamed rows while polling fails")
        sim.faults(outage=False)
        wait_until(lambda: count("poll") >= 2, 20, what="polled rows beside the stream")
        sim.faults(ws_refuse=True, ws_disconnects=1)  # the stream is out: polling alone stores
        polled = count("poll")
        wait_until(lambda: count("poll") >= polled + 3, 20, what="polled rows during the stream outage")
        sim.faults(ws_refuse=False)
        wait_until(lambda: server.output.count("price stream subscribed") >= 2, 20, what="the stream back")
        server.process.popen.send_signal(signal.SIGINT)
        assert server.process.popen.wait(10) == 0
    finally:
        server.stop()

    with sqlite3.connect(database) as connection:
        stored = connection.execute(
            "SELECT ticker, slot_ts, source FROM price_ticks ORDER BY slot_ts"
        ).fetchall()
    for ticker in ("btc_usd", "eth_usd"):
        slots = [slot for each, slot, _ in stored if each == ticker]
        assert len(slots) == len(set(slots))
        assert slots == list(range(slots[0], slots[-1] + 1)), "a slot has no row"
    assert {source for *_, source in stored} == {"poll", "stream"}
    assert "Traceback" not in server.output
