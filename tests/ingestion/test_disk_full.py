"""SQLite on a disk that fills up (a real size-limited filesystem): a tick never reports a row
stored that was not committed; it keeps the rows and retries until space is back, or logs a
`tick lost` naming every row."""

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.tick import TickSummary
from tests.support.services import ApiServer, SimServer
from tests.support.settings import INGEST_TICKERS, ingestion_settings
from tests.support.slots import roomy_slot
from tests.support.small_filesystem import SmallFilesystem
from tests.support.waiting import wait_until, wait_until_async


@pytest.fixture
def disk() -> Iterator[SmallFilesystem]:
    with SmallFilesystem(16 << 20) as disk:
        yield disk


@pytest.fixture
async def sqlite_on_disk(disk: SmallFilesystem) -> AsyncIterator[tuple[str, AsyncEngine]]:
    url = f"sqlite:///{disk.path / 'prices.db'}"
    await asyncio.to_thread(migrations.upgrade, url)
    engine = create_engine(url)
    async with engine.connect() as connection:  # open the WAL before the disk fills
        await connection.execute(text("SELECT 1"))
    yield url, engine
    await engine.dispose()


async def rows_in(engine: AsyncEngine) -> list[tuple[str, int]]:
    async with engine.connect() as connection:
        result = await connection.execute(text("SELECT ticker, ts FROM price_ticks ORDER BY ticker"))
        return [(ticker, int(ts)) for ticker, ts in result]


def events(logs: list[Any], prefix: str) -> list[Any]:
    return [line for line in logs if line["event"].startswith(prefix)]


async def run_tick(
    sim: SimServer, deribit: DeribitHttpClient, url: str, engine: AsyncEngine, delay: int
) -> TickSummary:
    settings = ingestion_settings(sim, url, ingest_max_write_delay_seconds=delay)
    return await IngestionRuntime(settings, engine, deribit, deribit).run_tick(await roomy_slot())


async def test_a_full_disk_keeps_the_tick_until_space_is_back(
    sim: SimServer,
    deribit: DeribitHttpClient,
    disk: SmallFilesystem,
    sqlite_on_disk: tuple[str, AsyncEngine],
) -> None:
    url, engine = sqlite_on_disk
    count = text("SELECT count(*) FROM price_ticks")
    # A reader that has read before the disk fills: a first read cannot open a full WAL's index.
    reading = create_engine(url, read_only=True)
    async with reading.connect() as reader:
        assert (await reader.execute(count)).scalar_one() == 0
        assert disk.fill() > 0
        with capture_logs() as logs:
            tick = asyncio.create_task(run_tick(sim, deribit, url, engine, delay=60))
            await wait_until_async(
                lambda: asyncio.sleep(0, events(logs, "database unavailable, keeping the tick")),
                30,
                what="the write to fail on the full disk and be retried",
            )
            assert not tick.done()
            # Nothing committed while the disk is full.
            assert (await reader.execute(count)).scalar_one() == 0
            disk.free()
            summary = await tick
    await reading.dispose()
    assert [o.status for o in summary.outcomes] == ["stored"] * len(INGEST_TICKERS)
    assert await rows_in(engine) == sorted((o.ticker, o.ts or 0) for o in summary.outcomes)
    assert events(logs, "tick lost") == []


async def test_a_full_disk_past_the_bound_is_a_tick_lost_naming_every_row(
    sim: SimServer,
    deribit: DeribitHttpClient,
    disk: SmallFilesystem,
    sqlite_on_disk: tuple[str, AsyncEngine],
) -> None:
    url, engine = sqlite_on_disk
    disk.fill()
    with capture_logs() as logs:
        summary = await run_tick(sim, deribit, url, engine, delay=0)
    disk.free()
    assert summary.count("stored") == 0
    assert {(o.status, o.reason) for o in summary.outcomes} == {("failed", "database_unavailable")}
    (lost,) = events(logs, "tick lost")
    assert sorted(row["ticker"] for row in lost["rows"]) == sorted(INGEST_TICKERS)
    assert await rows_in(engine) == []


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_serve_on_a_full_disk_says_stored_only_for_committed_rows(
    sim: SimServer, disk: SmallFilesystem, tmp_path: Path
) -> None:
    database = disk.path / "serve.db"
    env = {
        "DATABASE_URL": f"sqlite:///{database}",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "INGEST_MAX_WRITE_DELAY_SECONDS": "60",
        "BACKFILL_INTERVAL_SECONDS": "0",  # only the ticks write: each claim is theirs
        "LOG_FORMAT": "json",
    }

    def finished() -> list[dict[str, Any]]:
        return [line for line in _json_lines(server.output) if line["event"] == "tick finished"]

    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:
        wait_until(lambda: len(finished()) >= 2, 20, what="two ticks before the disk fills")
        disk.fill()
        wait_until(
            lambda: server.output.count("database unavailable, keeping the tick") >= 3,
            30,
            what="ticks kept while the disk is full",
        )
        held = len(finished())
        disk.free()
        wait_until(lambda: len(finished()) >= held + 5, 60, what="the held ticks and new ones to finish")
    claims = {line["slot_ts"]: line["stored"] for line in finished()}
    with sqlite3.connect(database) as connection:
        rows = dict(connection.execute("SELECT slot_ts, count(*) FROM price_ticks GROUP BY slot_ts"))
    wrong = {slot: (said, rows.get(slot, 0)) for slot, said in claims.items() if said != rows.get(slot, 0)}
    assert wrong == {}, "tick finished said stored (said, in the table)"
    assert "tick lost" not in server.output
