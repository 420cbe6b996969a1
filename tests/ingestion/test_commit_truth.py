"""Only a committed write counts as stored: the connection to PostgreSQL is cut at COMMIT
(before it reaches the server, or after the server answered) by a real TCP proxy, and the
table must then hold exactly what the tick, its logs and the runners say was stored."""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.clients.source import Observation
from crypto_client.db.engine import create_engine
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.runtime import IngestionRuntime
from crypto_client.ingestion.stream import StreamWriter
from crypto_client.ingestion.tick import TickSummary
from tests.support import launcher
from tests.support.celery_stack import CeleryStack
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.pg_proxy import PgProxy
from tests.support.services import SimServer, ThrowawayRedis, crypto_client
from tests.support.settings import INGEST_TICKERS, ingestion_settings
from tests.support.slots import roomy_slot, roomy_slot_blocking
from tests.support.waiting import wait_until

Row = tuple[str, int, str, str]  # ticker, ts, price, source


@pytest.fixture
async def database() -> AsyncIterator[str]:
    url = await create_pg_database(prefix="cc_commit")
    yield url
    await drop_pg_database(url)


@pytest.fixture
def proxy(database: str) -> Iterator[PgProxy]:
    with PgProxy("127.0.0.1", make_url(database).port or 5432) as proxy:
        yield proxy


@pytest.fixture
async def proxied(database: str, proxy: PgProxy) -> AsyncIterator[AsyncEngine]:
    """The service's write engine, connected through the proxy (warmed up: no cut is spent
    on connecting)."""
    engine = create_engine(proxy.url(database), pool_size=2)
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    yield engine
    await engine.dispose()


async def table(database: str) -> list[Row]:
    """Every row of `price_ticks`, read directly (not through the proxy)."""
    engine = create_engine(database)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                text("SELECT ticker, ts, price::text, source FROM price_ticks ORDER BY ticker, ts")
            )
            return [(ticker, int(ts), price, source) for ticker, ts, price, source in result]
    finally:
        await engine.dispose()


def said_stored(summary: TickSummary) -> list[Row]:
    return sorted(
        (o.ticker, o.ts or 0, str(o.price), "poll") for o in summary.outcomes if o.status == "stored"
    )


def lost_rows(logs: list[MutableMapping[str, Any]]) -> list[dict[str, Any]]:
    return [row for line in logs if line["event"].startswith("tick lost") for row in line["rows"]]


async def tick(sim: SimServer, engine: AsyncEngine, database: str, **overrides: object) -> TickSummary:
    settings = ingestion_settings(sim, database, **overrides)
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=2, backoff_seconds=0.01) as deribit:
        return await IngestionRuntime(settings, engine, deribit, deribit).run_tick(await roomy_slot())


@pytest.mark.parametrize(
    "cuts", [["before"], ["after"], ["before", "after"], ["after", "before", "after"]], ids="-".join
)
async def test_a_cut_commit_is_retried_and_each_row_stored_once(
    sim: SimServer, database: str, proxy: PgProxy, proxied: AsyncEngine, cuts: list[str]
) -> None:
    for mode in cuts:
        proxy.cut_next_commit(mode)  # type: ignore[arg-type]
    with capture_logs() as logs:
        summary = await tick(sim, proxied, database, ingest_max_write_delay_seconds=30)
    assert proxy.cuts == len(cuts)
    assert [o.status for o in summary.outcomes] == ["stored"] * len(INGEST_TICKERS), summary
    rows = await table(database)
    assert rows == said_stored(summary), "the table disagrees with what the tick reported"
    assert sorted(ticker for ticker, *_ in rows) == sorted(INGEST_TICKERS)  # every row once
    assert lost_rows(logs) == []
    assert any(line["event"].startswith("database unavailable, keeping the tick") for line in logs)


async def test_a_cut_mid_query_is_retried(
    sim: SimServer, database: str, proxy: PgProxy, proxied: AsyncEngine
) -> None:
    proxy.cut_mid_query()
    summary = await tick(sim, proxied, database, ingest_max_write_delay_seconds=30)
    assert proxy.cuts == 1
    assert summary.count("stored") == len(INGEST_TICKERS)
    assert await table(database) == said_stored(summary)


async def test_a_commit_that_cannot_be_retried_is_a_tick_lost_naming_every_row(
    sim: SimServer, database: str, proxy: PgProxy, proxied: AsyncEngine
) -> None:
    proxy.cut_next_commit("before")
    with capture_logs() as logs:
        summary = await tick(sim, proxied, database, ingest_max_write_delay_seconds=0)
    assert proxy.cuts == 1
    assert await table(database) == []
    assert summary.count("stored") == 0
    assert {(o.status, o.reason) for o in summary.outcomes} == {("failed", "database_unavailable")}
    assert sorted(row["ticker"] for row in lost_rows(logs)) == sorted(INGEST_TICKERS)


async def test_an_unanswered_commit_past_the_bound_is_reported_in_doubt(
    sim: SimServer, database: str, proxy: PgProxy, proxied: AsyncEngine
) -> None:
    proxy.cut_next_commit("after")
    with capture_logs() as logs:
        summary = await tick(sim, proxied, database, ingest_max_write_delay_seconds=0)
    # Committed, but nobody heard it: never claimed stored, and the loss line says it may be.
    assert len(await table(database)) == len(INGEST_TICKERS)
    assert summary.count("stored") == 0
    assert len(summary.outcomes) == len(INGEST_TICKERS)
    assert all("COMMIT went unanswered" in (o.error or "") for o in summary.outcomes)
    lost = lost_rows(logs)
    assert sorted(row["ticker"] for row in lost) == sorted(INGEST_TICKERS)
    assert all(row.get("in_doubt") for row in lost)


@pytest.mark.parametrize("mode", ["before", "after"])
async def test_the_stream_writer_counts_only_committed_rows(
    database: str, proxy: PgProxy, proxied: AsyncEngine, mode: str
) -> None:
    writer = StreamWriter(proxied, 60, 30, SourceClock())
    now = time.time()
    for ticker in INGEST_TICKERS:
        await writer.on_observation(Observation(ticker, _price(ticker), None, now - 0.1, now))
    proxy.cut_next_commit(mode)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await writer.flush()
    assert proxy.cuts == 1
    rows = await table(database)
    assert [(ticker, source) for ticker, _, _, source in rows] == [
        (t, "stream") for t in sorted(INGEST_TICKERS)
    ]
    assert writer.stored == len(rows)
    assert lost_rows(logs) == []


def _price(ticker: str) -> Decimal:
    return Decimal(f"{len(ticker)}.25")


def test_cli_ingest_tells_the_truth_after_a_cut_commit(sim: SimServer, database: str, proxy: PgProxy) -> None:
    proxy.cut_next_commit("before")
    proxy.cut_next_commit("after")
    # A day-long slot with minutes left: a loaded machine can take seconds to start the
    # process, and its tick must still not be late.
    roomy_slot_blocking(86400, room=120)
    done = launcher.run(
        crypto_client("ingest"),
        env={
            "DATABASE_URL": proxy.url(database),
            "DERIBIT_RPC_URL": sim.rpc_url,
            "TICKERS": ",".join(INGEST_TICKERS),
            "INGEST_INTERVAL_SECONDS": "86400",
            "INGEST_MAX_WRITE_DELAY_SECONDS": "30",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert proxy.cuts == 2
    printed = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.strip()}
    assert printed == dict.fromkeys(INGEST_TICKERS, "stored")
    rows = asyncio.run(table(database))
    assert sorted(ticker for ticker, *_ in rows) == sorted(INGEST_TICKERS)


@pytest.mark.slow
async def test_a_celery_task_reports_only_what_was_committed(
    sim: SimServer, redis_server: ThrowawayRedis, database: str, proxy: PgProxy, tmp_path: Path
) -> None:
    stack = CeleryStack(
        tmp=tmp_path,
        sim=sim,
        db_url=proxy.url(database),
        broker_url=redis_server.url,
        # Hour-long slots: the task and its write retries always finish inside the slot.
        interval=3600,
        extra_env={"INGEST_MAX_WRITE_DELAY_SECONDS": "30"},
    )
    try:
        worker = stack.worker(concurrency=1)
        proxy.cut_next_commit("before")
        proxy.cut_next_commit("after")
        stack.publish_tick()
        finished = await asyncio.to_thread(
            wait_until,
            lambda: [line for line in _json_lines(worker.output) if line.get("event") == "task finished"],
            60,
            what="the task to finish",
        )
    finally:
        stack.stop_all()
    assert proxy.cuts == 2
    assert (finished[0]["stored"], finished[0]["duplicate"], finished[0]["failed"]) == (3, 0, 0)
    assert sorted(ticker for ticker, *_ in await table(database)) == sorted(INGEST_TICKERS)


def _json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                lines.append(parsed)
    return lines
