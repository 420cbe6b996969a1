"""No silent loss, no wrong value: clocks, slot edges and bad values from a hostile Deribit,
through the ingestion function over HTTP to the simulator, on PostgreSQL and SQLite."""

import asyncio
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.source import FetchResult, HistoryPoint, Observation
from crypto_client.domain import current_slot
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.embedded_scheduler import IntervalScheduler
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.tick import TickSummary
from tests.support.api import api_client
from tests.support.services import SimServer
from tests.support.settings import INGEST_TICKERS, ingestion_settings, make_settings
from tests.support.slots import roomy_slot
from tests.support.waiting import wait_until_async

TICKERS = INGEST_TICKERS


async def rows_of(engine: AsyncEngine) -> list[tuple[str, int, int | None, str]]:
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT ticker, ts, slot_ts, price FROM price_ticks ORDER BY ts")
        )
        return [(ticker, ts, slot, str(price)) for ticker, ts, slot, price in result]


async def tick_now(runtime: IngestionRuntime) -> TickSummary:
    """One tick at the start of the next slot, as the scheduler runs it."""
    interval = runtime.settings.ingest_interval_seconds
    slot = current_slot(interval) + interval
    await asyncio.sleep(max(0.0, slot - time.time()))
    return await runtime.run_tick(slot)


def assert_rows_in_their_slots(rows: Sequence[tuple[str, int, int | None, str]], interval: int) -> None:
    for ticker, ts, slot, _price in rows:
        assert slot is not None
        assert slot <= ts < slot + interval, f"{ticker}: ts {ts} outside its slot {slot}"
    slots = [(ticker, slot) for ticker, _, slot, _ in rows]
    assert len(slots) == len(set(slots))


# --- the clock rule, on observations made up to the microsecond ------------------------------


def observation(
    server_time_us: int | None, sent_at: float = 1_800_000_000.0, rtt: float = 0.05
) -> Observation:
    return Observation("btc_usd", Decimal("1"), server_time_us, sent_at, sent_at + rtt)


def test_a_consistent_source_time_is_used() -> None:
    timing = SourceClock().time_of(observation(1_800_000_000_020_000))
    assert (timing.clock, timing.ts) == ("source", 1_800_000_000.02)


@pytest.mark.parametrize(
    "server_time_us",
    [
        None,
        -5_000,
        1_795_645,  # milliseconds read as microseconds: 1970
        (1_800_000_000 + 7_200) * 1_000_000,  # two hours ahead
        10**25,
    ],
)
def test_an_implausible_source_time_is_replaced_by_the_local_one(server_time_us: int | None) -> None:
    timing = SourceClock().time_of(observation(server_time_us))
    assert timing.clock == "local"
    assert timing.ts == 1_800_000_000.05
    assert timing.problem


def test_a_small_steady_offset_is_learned_and_a_jump_is_not() -> None:
    clock = SourceClock()
    clocks = []
    for second in range(40):  # Deribit's clock 3 s ahead of ours, steadily
        sent = 1_800_000_000.0 + second
        clocks.append(clock.time_of(observation(int((sent + 3.02) * 1e6), sent)).clock)
    assert clocks[0] == "local"  # not believed before it is measured ...
    assert clocks[-20:] == ["source"] * 20  # ... then learned
    assert 2.9 < clock.offset_seconds < 3.1
    jumped = clock.time_of(observation(int((1_800_000_100 + 9) * 1e6), 1_800_000_100.0))
    assert jumped.clock == "local"  # 9 s is within the bound, but 6 s off the learned offset
    # and until the clock is steady again, no offset is believed at all
    assert clock.offset_seconds == 0.0


# --- hostile answers through ingest_tick, both backends ------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        {"clock_offset_seconds": 7200},
        {"clock_offset_seconds": -30},
        {"clock_frozen": True},
        {"us_out_literal": "-5000"},
        {"us_out_literal": "1795645"},
        {"us_out_literal": '"soon"'},
        {"us_out_literal": "true"},
        {"us_out_literal": "1e25"},
    ],
    ids=["2h-ahead", "step-back", "frozen", "negative", "ms-scale", "string", "boolean", "huge"],
)
async def test_a_lying_clock_changes_nothing_but_warnings(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str, faults: dict[str, Any]
) -> None:
    settings = ingestion_settings(sim, db_url, ingest_interval_seconds=1)
    runtime = IngestionRuntime(settings, engine, deribit, deribit)
    sim.faults(**faults)
    with capture_logs() as logs:
        summaries = [await tick_now(runtime) for _ in range(3)]
    assert all(summary.count("stored") == len(TICKERS) for summary in summaries), summaries
    rows = await rows_of(engine)
    assert len(rows) == 3 * len(TICKERS)
    assert_rows_in_their_slots(rows, 1)
    assert all(abs(ts - time.time()) < 15 for _, ts, _, _ in rows)
    warned = [line for line in logs if line["event"].startswith("source time not used")]
    assert warned, "the replaced source time was not reported"
    assert {"source_time_us", "local_time", "problem"} <= set(warned[-1])


async def test_bad_values_fail_alone(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    sim.pin(eth_usd="1E-20000", sol_usdc="1E+131072", btc_usd="43521.37")
    summary = await IngestionRuntime(ingestion_settings(sim, db_url), engine, deribit, deribit).run_tick(
        await roomy_slot()
    )
    outcome = {o.ticker: o for o in summary.outcomes}
    assert outcome["btc_usd"].status == "stored"
    for ticker in ("eth_usd", "sol_usdc"):
        assert (outcome[ticker].status, outcome[ticker].reason) == ("failed", "invalid_value")
        assert "price" in (outcome[ticker].error or "")
    assert [(t, p) for t, _, _, p in await rows_of(engine)] == [("btc_usd", "43521.37")]


class OneRefusedRow:
    """A price source whose answer for one ticker the table's checks refuse (an upper-case
    name): nothing the real client can produce, which is why it is made up here."""

    async def fetch_prices(
        self, tickers: Sequence[str], *, deadline: float | None = None
    ) -> list[FetchResult]:
        now = time.time()
        return [FetchResult(t, Observation(t, Decimal("2.5"), None, now, now)) for t in tickers]

    @property
    def history_ranges(self) -> Mapping[str, int | None]:
        return {"all": None}

    async def fetch_history(self, ticker: str, range_name: str) -> list[HistoryPoint]:
        return []

    async def aclose(self) -> None:
        return None


async def test_a_row_the_database_refuses_does_not_cost_the_others(engine: AsyncEngine, db_url: str) -> None:
    settings = make_settings(db_url).model_copy(update={"tickers": ("btc_usd", "BAD", "eth_usd")})
    with capture_logs() as logs:
        summary = await IngestionRuntime(settings, engine, OneRefusedRow(), OneRefusedRow()).run_tick(
            await roomy_slot()
        )
    outcome = {o.ticker: o for o in summary.outcomes}
    assert (outcome["BAD"].status, outcome["BAD"].reason) == ("failed", "invalid_value")
    assert "refused" in (outcome["BAD"].error or "")
    assert [outcome[t].status for t in ("btc_usd", "eth_usd")] == ["stored", "stored"]
    assert sorted(t for t, _, _, _ in await rows_of(engine)) == ["btc_usd", "eth_usd"]
    assert not any(line["event"].startswith("tick lost") for line in logs)


async def test_a_late_answer_never_takes_its_slot(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str
) -> None:
    settings = ingestion_settings(sim, db_url, ingest_interval_seconds=2)
    sim.faults("eth_usd", latency_ms=2500)  # crosses the end of a 2 s slot whenever it starts
    summary = await tick_now(IngestionRuntime(settings, engine, deribit, deribit))
    outcome = {o.ticker: o for o in summary.outcomes}
    assert (outcome["eth_usd"].status, outcome["eth_usd"].reason) == ("failed", "late")
    assert "not answered before its slot" in (outcome["eth_usd"].error or "")  # not waited for
    assert outcome["btc_usd"].status == "stored"
    rows = await rows_of(engine)
    assert "eth_usd" not in {t for t, _, _, _ in rows}
    assert_rows_in_their_slots(rows, 2)


@pytest.mark.parametrize(
    ("sent", "served"), [("1E+5", "100000"), ("1.5E-7", "0.00000015"), ("2291.40", "2291.40")]
)
async def test_every_endpoint_writes_one_plain_decimal_form(
    sim: SimServer, deribit: DeribitHttpClient, engine: AsyncEngine, db_url: str, sent: str, served: str
) -> None:
    sim.pin(btc_usd=sent)
    settings = ingestion_settings(sim, db_url, tickers="btc_usd")
    summary = await IngestionRuntime(settings, engine, deribit, deribit).run_tick(await roomy_slot())
    assert summary.count("stored") == 1
    async with api_client(settings) as api:
        bodies = [
            (await api.get(path, params={"ticker": "btc_usd"})).text
            for path in ("/prices", "/prices/latest", "/prices/range")
        ]
    for body in bodies:
        assert f'"price":{served},' in body, body
    assert Decimal(served) == Decimal(sent)


def stored_slots(summaries: list[TickSummary]) -> set[tuple[str, int | None]]:
    return {(o.ticker, s.slot_ts) for s in summaries for o in s.outcomes if o.status == "stored"}


async def test_a_hundred_tickers_every_second_give_one_row_per_ticker_per_slot(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    tickers = [f"sim{n:03d}_usd" for n in range(100)]
    settings = ingestion_settings(sim, db_url, tickers=",".join(tickers), ingest_interval_seconds=1)
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=2, max_concurrency=32) as client:
        runtime = IngestionRuntime(settings, engine, client, client)
        # Warm up as a running service is: the HTTP connections and the database connection open.
        assert all(result.observation for result in await client.fetch_prices(tickers))
        async with engine.connect():
            pass
        summaries: list[TickSummary] = []

        async def run_slot(slot: int) -> TickSummary:
            summary = await runtime.run_tick(slot)
            summaries.append(summary)
            return summary

        # The scheduler runs the current slot at once; start it as a slot begins.
        await asyncio.sleep(current_slot(1) + 1 - time.time())
        scheduler = IntervalScheduler(1, run_slot)
        scheduler.start()
        try:
            # At least five ticks, and one that stored something: on a loaded machine whole
            # slots can go by with every fetch late, which proves nothing about the rows.
            await wait_until_async(
                lambda: asyncio.sleep(0, len(summaries) >= 5 and bool(stored_slots(summaries))),
                60,
                what="5 ticks, one of them storing rows",
            )
        finally:
            await scheduler.stop()
    rows = await rows_of(engine)
    assert_rows_in_their_slots(rows, 1)
    # Whether all 100 fit in a 1-second slot is a matter of speed (bench/); what must hold
    # whatever the load: each stored outcome is exactly one row of its slot, nothing else was
    # written, and a ticker not fetched within its slot is reported late, never stored late.
    stored = stored_slots(summaries)
    assert sorted((ticker, slot) for ticker, _, slot, _ in rows) == sorted(stored)
    assert all(len(summary.outcomes) == 100 for summary in summaries)
    others = {(o.status, o.reason) for s in summaries for o in s.outcomes if o.status != "stored"}
    assert others <= {("failed", "late")}, others
