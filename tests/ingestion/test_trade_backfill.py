"""Back-fill from Deribit's trade history (issue 25), against the simulator over HTTP.

What the simulator "has" is computed from its own seeded history (`sim/history.py`), whose
instruments are checked against what it serves, so the expected rows are known exactly.
"""

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.coverage import measure
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.models import PriceTick, TrackedTicker, TradeBackfillDay
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import write_transaction
from crypto_client.domain import DAY_SECONDS, NewPrice, PriceRow
from crypto_client.ingestion.runtime import open_runtime, pending_write_seconds
from crypto_client.sim.history import TradeHistory
from crypto_client.sim.prices import PriceWalk
from tests.support import launcher, local_http
from tests.support.databases import create_pg_database, drop_pg_database, stored_rows
from tests.support.services import SimServer, crypto_client
from tests.support.settings import make_settings
from tests.support.waiting import wait_until_async

TICKER = "btc_usd"
INTERVAL = 60
TRADES = "public/get_last_trades_by_instrument_and_time"


def week() -> tuple[str, str, int, int]:
    """Seven whole UTC days ending two days ago: older than the main host's 24 hours, and
    spanning the simulator's expired future's last trading days."""
    today = int(time.time()) // DAY_SECONDS * DAY_SECONDS
    first, last = today - 8 * DAY_SECONDS, today - 2 * DAY_SECONDS
    return _day(first), _day(last), first, last + DAY_SECONDS - INTERVAL


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def expected_first_trades(sim: SimServer, first: int, last: int) -> dict[int, tuple[int, Decimal, str]]:
    """slot -> (ts, index_price, instrument) of the first trade of any btc_usd instrument."""
    history = TradeHistory(PriceWalk(0), 0, int(time.time() * 1000))
    served = {
        i["instrument_name"]: i
        for expired in ("false", "true")
        for i in local_http.get(
            f"{sim.rpc_url}/public/get_instruments", params={"currency": "BTC", "expired": expired}
        ).json()["result"]
    }
    ours = [i for i in history.instruments if i["price_index"] == TICKER]
    assert {i["instrument_name"]: i["expiration_timestamp"] for i in ours} == {
        name: i["expiration_timestamp"] for name, i in served.items() if i["price_index"] == TICKER
    }
    chosen: dict[int, tuple[int, Decimal, str]] = {}
    first_ms: dict[int, int] = {}  # the first trade's time to the millisecond
    for slot in range(first, last + 1, INTERVAL):
        for instrument in ours:
            for trade in history.trades(instrument["instrument_name"], slot * 1000, slot * 1000 + 59_999):
                if slot not in first_ms or trade["timestamp"] < first_ms[slot]:
                    first_ms[slot] = trade["timestamp"]
                    chosen[slot] = (
                        trade["timestamp"] // 1000,
                        trade["index_price"],
                        trade["instrument_name"],
                    )
                break  # trades are oldest first: the instrument's first in the slot
    return chosen


def history_settings(sim: SimServer) -> dict[str, object]:
    return {
        "tickers": TICKER,
        "deribit_rpc_url": sim.rpc_url,
        "deribit_history_url": f"{sim.url}/history/api/v2",
        "deribit_history_requests_per_second": 20,
        "deribit_retry_backoff_seconds": 0.01,
        "ingest_interval_seconds": INTERVAL,
    }


async def test_a_week_of_slots_is_filled_from_the_first_trade_in_each(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    _, _, first, last = week()
    expected = expected_first_trades(sim, first, last)
    no_trade = set(range(first, last + 1, INTERVAL)) - set(expected)
    assert no_trade
    # Polled rows the back-fill must leave alone: one in a slot with a trade, one without.
    polled = [
        NewPrice(TICKER, Decimal("1.25"), min(expected) + 1, min(expected), "poll"),
        NewPrice(TICKER, Decimal("2.5"), min(no_trade) + 2, min(no_trade), "poll"),
    ]
    # On some dates the week's first trade is the future's; that slot holds the polled row.
    only_future = {
        slot
        for slot, (_, _, name) in expected.items()
        if not name.endswith("PERPETUAL") and slot != polled[0].slot_ts
    }
    assert only_future
    async with write_transaction(engine) as writer:
        await writer.insert_many(polled)
    sim.faults(rate_limit_rate=0.2)  # Deribit's 10028 now and then: retried with backoff

    settings = make_settings(db_url, **history_settings(sim))
    async with open_runtime(settings) as runtime:
        (report,) = await runtime.trade_backfill(
            from_ts=first, to_ts=last + INTERVAL - 1, extend_tracking=True
        )
    assert report.ok, report.error
    assert sim.stats()["requests"][TRADES] > 0

    rows = {row.ts // INTERVAL * INTERVAL: row for row in await stored_rows(engine, TICKER)}
    for price in polled:
        assert rows.pop(price.ts // INTERVAL * INTERVAL) == PriceRow(TICKER, price.price, price.ts, "poll")
    wanted = {
        slot: PriceRow(TICKER, price, ts, "trade")
        for slot, (ts, price, _) in expected.items()
        if slot != polled[0].slot_ts
    }
    assert rows == wanted
    assert only_future <= set(rows)  # the expired future's trades fill slots alone

    async with engine.connect() as connection:
        coverage = await measure(
            PriceReader(connection), TICKER, INTERVAL, from_ts=first, to_ts=last + INTERVAL - 1, limit=100_000
        )
    assert coverage.stored_slots["trade"] == len(wanted)
    assert coverage.stored_slots["poll"] == 2
    gaps = {
        slot
        for gap in coverage.gaps
        if gap.reason == "no_trade_in_slot"
        for slot in range(gap.from_ts, gap.to_ts, INTERVAL)
    }
    assert gaps == no_trade - {polled[1].slot_ts}
    assert {gap.reason for gap in coverage.gaps} == {"no_trade_in_slot"}
    assert "BTC-PERPETUAL" in coverage.gaps[0].detail


def run_backfill(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return launcher.Popen(
        crypto_client("backfill", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def process_env(sim: SimServer, db_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DERIBIT_", "DATABASE_"))}
    for key, value in history_settings(sim).items():
        env[key.upper()] = str(value)
    env["DATABASE_URL"] = db_url
    env["LOG_FORMAT"] = "json"
    return env


async def count(engine: AsyncEngine, table: Table, at_least: int = 0) -> int:
    """The table's rows; 0 until there are `at_least`."""
    async with engine.connect() as connection:
        rows = int(await connection.scalar(select(func.count()).select_from(table)) or 0)
    return rows if rows >= at_least else 0


@pytest.fixture
async def fresh_pg() -> AsyncIterator[str]:
    url = await create_pg_database()
    await asyncio.to_thread(migrations.upgrade, url)
    yield url
    await drop_pg_database(url)


@pytest.mark.slow
async def test_a_run_killed_part_way_then_rerun_gives_the_same_rows(
    sim: SimServer, fresh_pg: str, tmp_path: Path
) -> None:
    since, until, first, last = week()
    expected = expected_first_trades(sim, first, last)
    env = process_env(sim, fresh_pg)
    engine = create_engine(fresh_pg)
    try:
        sim.faults(latency_ms=60)  # slow enough to be caught between its days
        process = run_backfill(env, "--since", since, "--until", until)
        days = cast(Table, TradeBackfillDay.__table__)
        try:
            await wait_until_async(lambda: count(engine, days, at_least=2), 60, what="two days checkpointed")
            assert process.poll() is None, "the run ended before it could be killed"
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            process.wait(10)
        done_at_kill = await count(engine, days)
        assert 2 <= done_at_kill < 7

        sim.reset()
        rerun = run_backfill(env, "--since", since, "--until", until)
        _out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        rerun_requests = sim.stats()["requests"][TRADES]

        rows = {row.ts // INTERVAL * INTERVAL: row for row in await stored_rows(engine, TICKER)}
        assert rows == {
            slot: PriceRow(TICKER, price, ts, "trade") for slot, (ts, price, _) in expected.items()
        }
        assert await count(engine, days) == 7

        # The same span, from scratch, takes more requests: the rerun skipped what was done.
        sim.reset()
        other = tmp_path / "reference.db"
        reference_url = f"sqlite:///{other}"
        await asyncio.to_thread(migrations.upgrade, reference_url)
        full = run_backfill(process_env(sim, reference_url), "--since", since, "--until", until)
        assert full.communicate(timeout=120)
        assert full.returncode == 0
        assert rerun_requests < sim.stats()["requests"][TRADES]

        sim.reset()
        again = run_backfill(env, "--since", since, "--until", until)
        again.communicate(timeout=60)
        assert again.returncode == 0
        assert sim.stats()["requests"].get(TRADES, 0) == 0  # every day is settled
    finally:
        await engine.dispose()


async def test_dry_run_writes_nothing_and_says_what_it_would_do(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    since, until, _first, _last = week()
    env = process_env(sim, db_url)
    process = run_backfill(env, "--since", since, "--until", until, "--dry-run")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"{TICKER:<20} slots to fill {7 * DAY_SECONDS // INTERVAL:>8}  days     7" in out, out
    assert "requests expected >=" in out
    assert "estimated duration >=" in out
    assert sim.stats()["requests"].get(TRADES, 0) == 0
    for model in (PriceTick, TrackedTicker, TradeBackfillDay):
        assert await count(engine, cast(Table, model.__table__)) == 0


def test_bad_dates_are_refused_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    for args, message in (
        (["--since", "2026-13-01"], "--since: '2026-13-01' is not a date (YYYY-MM-DD)"),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "--until is before --since"),
        (["--until", "2026-11-01"], "--until needs --since"),
    ):
        done = launcher.run(
            crypto_client("backfill", *args),
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_the_automatic_repair_fills_from_trades_what_the_chart_cannot(
    sim: SimServer, engine: AsyncEngine, db_url: str
) -> None:
    now = int(time.time())
    since = now // INTERVAL * INTERVAL - 2 * 3600
    async with write_transaction(engine) as writer:
        await writer.track([TICKER], since)
    # The chart of btc_usd is out (its requests name the index); trades are not.
    sim.faults(TICKER, outage=True)
    settings = make_settings(db_url, **history_settings(sim), deribit_max_retries=0)
    async with open_runtime(settings) as runtime:
        started = time.time()
        reports = await runtime.repair_recent()
    assert reports is not None
    (chart,) = reports
    assert not chart.ok
    assert sim.stats()["requests"][TRADES] > 0

    rows = await stored_rows(engine, TICKER)
    assert rows
    assert {row.source for row in rows} == {"trade"}
    last_repaired = max(row.ts for row in rows) // INTERVAL * INTERVAL
    # A slot whose observation may still be waiting to be written is left to it.
    assert last_repaired + INTERVAL <= started - pending_write_seconds(settings)
    expected = expected_first_trades(sim, since, last_repaired)
    assert {row.ts // INTERVAL * INTERVAL: row for row in rows} == {
        slot: PriceRow(TICKER, price, ts, "trade") for slot, (ts, price, _) in expected.items()
    }
