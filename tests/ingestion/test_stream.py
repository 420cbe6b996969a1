"""Deribit's WebSocket price stream against the simulator's, over a real WebSocket: prices,
heartbeats, drops, stalls, refusals and garbage."""

import asyncio
import itertools
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from structlog.testing import capture_logs

from crypto_client.clients.deribit import ws
from crypto_client.clients.deribit.ws import DeribitStream
from crypto_client.clients.source import Observation
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.runtime import open_runtime
from crypto_client.serve import create_embedded_app
from crypto_client.sim.faults import HostileFrame
from tests.support import local_http
from tests.support.databases import empty_database
from tests.support.metrics import value
from tests.support.services import ApiServer, Process, SimServer, crypto_client, free_port
from tests.support.settings import make_settings
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
    stream = DeribitStream(sim.ws_url, **{"backoff_seconds": 0.05, **options})  # type: ignore[arg-type]
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


def heartbeats_received() -> float:
    return REGISTRY.get_sample_value("crypto_client_stream_messages_total", {"kind": "heartbeat"}) or 0.0


async def test_test_requests_are_answered_so_the_connection_lives(running: Running) -> None:
    await running.stream.connected.wait()
    count = len(running.received.observations)
    heartbeats = heartbeats_received()
    # The simulator sends a test_request only once the previous one was answered, else it
    # closes the connection: a fourth one means three were answered.
    await wait_until_async(
        lambda: asyncio.sleep(0, heartbeats_received() >= heartbeats + 4), 15, what="four test_requests"
    )
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


async def test_a_server_silent_from_the_start_trips_the_watchdog_before_subscribing(
    fast_sim: SimServer,
) -> None:
    """No answer to set_heartbeat (a half-open connection at connect): the same watchdog, and
    the stream subscribes once the server answers again."""
    fast_sim.faults(ws_stall=True)
    with capture_logs() as logs:
        async with start(fast_sim, ["btc_usd"], stall_seconds=1) as running:

            async def watchdog_fired_twice() -> bool:
                return running.stream.reconnects >= 2

            await wait_until_async(watchdog_fired_twice, 10, what="the watchdog")
            assert not running.received.observations
            fast_sim.faults(ws_stall=False)
            await running.received.more_than(1, timeout=15)
    causes = [line["cause"] for line in logs if line["event"] == "price stream disconnected, reconnecting"]
    assert causes[0].startswith("StreamStalledError")


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


def stream_messages(kind: str) -> float:
    return REGISTRY.get_sample_value("crypto_client_stream_messages_total", {"kind": kind}) or 0.0


def skipped_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "price stream frame skipped"]


# Each kind that is a frame of its own and can be read whole (HUGE cannot: see below).
SKIPPABLE = [kind for kind in HostileFrame if kind is not HostileFrame.HUGE]


@pytest.mark.parametrize("kind", SKIPPABLE)
async def test_a_hostile_frame_is_skipped_counted_and_logged_once(
    fast_sim: SimServer, running: Running, kind: HostileFrame
) -> None:
    """Three of a kind: each skipped and counted, one log line (rate-limited), and the same
    connection goes on delivering prices."""
    await running.received.more_than(1)
    malformed = stream_messages("malformed")
    with capture_logs() as logs:
        fast_sim.faults(ws_hostile_next=[kind] * 3)

        async def skipped() -> bool:
            return stream_messages("malformed") >= malformed + 3

        await wait_until_async(skipped, 10, what=f"three {kind} frames counted")
        await running.received.more_than(len(running.received.of("btc_usd")) + 2)
    assert not running.task.done()
    assert running.stream.reconnects == 0
    lines = skipped_lines(logs)
    assert len(lines) == 1, lines
    assert lines[0]["url"] == fast_sim.ws_url
    assert lines[0]["frame"]
    assert lines[0]["reason"]
    assert all(o.ticker in ("btc_usd", "eth_usd") for o in running.received.observations)


async def test_a_frame_over_the_size_limit_costs_one_reconnect(fast_sim: SimServer, running: Running) -> None:
    """A frame bigger than MAX_FRAME_BYTES cannot be read to be skipped: the protocol refuses
    it (close code 1009) and the stream connects again."""
    await running.received.more_than(1)
    with capture_logs() as logs:
        fast_sim.faults(ws_hostile_next=[HostileFrame.HUGE])

        async def reconnected() -> bool:
            return running.stream.reconnects == 1 and running.stream.connected.is_set()

        await wait_until_async(reconnected, 10, what="a reconnect")
        await running.received.more_than(len(running.received.of("btc_usd")) + 2)
    cause = next(line["cause"] for line in logs if line["event"] == "price stream disconnected, reconnecting")
    assert "1009" in cause


async def test_notifications_of_channels_never_subscribed_are_dropped(fast_sim: SimServer) -> None:
    fast_sim.faults(ws_unsubscribed_channels=["deribit_price_index.sol_usdc", "trades.BTC-PERPETUAL.raw"])
    unsubscribed = stream_messages("unsubscribed")
    with capture_logs() as logs:
        async with start(fast_sim, ["btc_usd"], stall_seconds=3) as running:

            async def dropped() -> bool:
                return stream_messages("unsubscribed") >= unsubscribed + 10

            await wait_until_async(dropped, 10, what="unsubscribed notifications counted")
            await running.received.more_than(3)
    assert {o.ticker for o in running.received.observations} == {"btc_usd"}
    lines = skipped_lines(logs)
    assert len(lines) == 1  # rate-limited: one line for all of them
    assert "sol_usdc" in lines[0]["frame"] or "BTC-PERPETUAL" in lines[0]["frame"]


async def test_the_backoff_starts_again_after_each_good_session(fast_sim: SimServer) -> None:
    """Twelve drops in a row, each after a session that delivered prices: every reconnect
    comes within the first backoff step, by the simulator's own connection log."""
    fast_sim.faults(ws_drop_after=3)
    async with start(fast_sim, ["btc_usd"], stall_seconds=3, backoff_seconds=0.2):

        def connections() -> list[dict[str, Any]]:
            return list(fast_sim.stats()["ws_connections"])

        await asyncio.to_thread(wait_until, lambda: len(connections()) >= 13, 30, what="thirteen connections")
        sessions = connections()
    for dropped, then in itertools.pairwise(sessions[:13]):
        assert dropped["subscribed"] is not None
        assert dropped["notifications"] >= 3
        assert then["opened"] - dropped["closed"] < 2.0, sessions


@pytest.mark.slow
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


@pytest.mark.slow
async def test_the_stream_command_stores_on_through_hostile_frames(
    sim: SimServer, postgresql_url: str, tmp_path: Path
) -> None:
    """Every hostile frame that fits the size limit, and an unsubscribed index, into a running
    `crypto-client stream`: all skipped and counted, the same connection stores on, and no
    row of the unsubscribed index."""
    sim.faults(stream_interval_ms=200)
    await empty_database(postgresql_url)
    engine = create_engine(postgresql_url)
    port = free_port()
    env = {
        "DATABASE_URL": postgresql_url,
        "DERIBIT_WS_URL": sim.ws_url,
        "TICKERS": "btc_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "METRICS_PORT": str(port),
        "LOG_FORMAT": "json",
    }
    consumer = Process(crypto_client("stream"), env, tmp_path / "stream.log")

    async def rows(ticker: str) -> int:
        async with engine.connect() as connection:
            query = text("SELECT count(*) FROM price_ticks WHERE ticker = :ticker")
            return int((await connection.execute(query, {"ticker": ticker})).scalar_one())

    def metric(name: str, **labels: str) -> float:
        return value(local_http.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, name, **labels)

    try:
        await wait_until_async(lambda: rows("btc_usd"), 30, what="streamed rows")
        sim.faults(ws_hostile_next=SKIPPABLE, ws_unsubscribed_channels=["deribit_price_index.eth_usd"])
        await asyncio.to_thread(
            wait_until,
            lambda: (
                metric("crypto_client_stream_messages_total", kind="malformed") >= len(SKIPPABLE)
                and metric("crypto_client_stream_messages_total", kind="unsubscribed") >= 3
            ),
            20,
            what="the hostile frames counted",
        )
        stored = await rows("btc_usd")

        async def stored_on() -> bool:
            return await rows("btc_usd") >= stored + 3

        await wait_until_async(stored_on, 20, what="rows stored after the hostile frames")
        assert metric("crypto_client_stream_connected") == 1
        assert metric("crypto_client_stream_reconnects_total") == 0
        assert metric("crypto_client_stream_restarts_total") == 0
        assert await rows("eth_usd") == 0
    finally:
        consumer.stop()
        await engine.dispose()
    assert "price stream frame skipped" in consumer.output
    assert "Traceback" not in consumer.output


@pytest.mark.slow
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


async def test_a_crashed_consumer_is_restarted_and_readyz_says_so(
    fast_sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve`'s consumer, in this process. No frame crashes it any more, so the crash is a
    bug put in by hand: the parser raises while it is patched."""
    settings = make_settings(
        f"sqlite:///{tmp_path / 'serve.db'}",
        tickers="btc_usd",
        deribit_rpc_url=fast_sim.rpc_url,
        deribit_ws_url=fast_sim.ws_url,
        stream_enabled=True,
        ingest_interval_seconds=1,
        backfill_interval_seconds=0,
    )
    app = create_embedded_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://serve") as api,
    ):

        async def readiness(stream: str, status: int) -> bool:
            response = await api.get("/readyz")
            return response.status_code == status and response.json()["stream"].startswith(stream)

        await wait_until_async(lambda: readiness("connected", 200), 20, what="the stream connected")
        restarts = REGISTRY.get_sample_value("crypto_client_stream_restarts_total") or 0.0

        def injected_bug(*_args: object) -> None:
            raise RuntimeError("injected bug")

        with capture_logs() as logs:
            monkeypatch.setattr(ws, "parse_index_notification", injected_bug)
            await wait_until_async(lambda: readiness("not running: RuntimeError", 503), 10, what="503")
            assert REGISTRY.get_sample_value("crypto_client_stream_connected") == 0
            assert (REGISTRY.get_sample_value("crypto_client_stream_restarts_total") or 0) >= restarts + 1
            monkeypatch.undo()
            await wait_until_async(lambda: readiness("connected", 200), 20, what="the stream back")
    crash = next(line for line in logs if line["event"] == "price stream consumer crashed, restarting")
    assert crash["log_level"] == "error"
    assert crash["wait_seconds"] > 0


async def test_the_consumer_says_every_period_what_it_received_stored_and_reconnected(
    fast_sim: SimServer, tmp_path: Path
) -> None:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'stream.db'}",
        tickers="btc_usd,eth_usd",
        deribit_ws_url=fast_sim.ws_url,
        ingest_interval_seconds=1,
    )
    await asyncio.to_thread(migrations.upgrade, settings.database_url_value)
    fast_sim.faults(ws_drop_after=5)  # every connection is dropped after five notifications
    with capture_logs() as logs:
        async with open_runtime(settings) as runtime:
            task = asyncio.create_task(runtime.run_stream(report_every_seconds=0.5))
            try:

                async def reports() -> list[MutableMapping[str, Any]]:
                    found = [line for line in logs if line["event"] == "stream running"]
                    return found if sum(line["reconnects"] for line in found) >= 1 and len(found) >= 3 else []

                seen = await wait_until_async(reports, 30, what="reports with a reconnect")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert sum(line["prices_received"] for line in seen) > 0
    assert sum(line["rows_stored"] for line in seen) > 0
    assert all(line["log_level"] == "info" and line["period_seconds"] == 0.5 for line in seen)
