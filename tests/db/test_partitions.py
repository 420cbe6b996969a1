"""Time partitioning on PostgreSQL (revision 0006 and the storage upkeep): a populated table
converted without losing a row, months made ahead, the default partition emptied into them,
whole expired months dropped, and queries that touch only the partitions they need."""

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.pages import page_statement
from crypto_client.db.writer import PriceWriter, write_transaction
from crypto_client.domain import NewPrice
from crypto_client.ingestion import maintenance
from crypto_client.ingestion.maintenance import maintain_storage, month_partition
from tests.support.databases import create_pg_database, drop_pg_database

YEAR_2030 = month_partition(2030, 1).lower
DAY = 86_400


@pytest.fixture
async def converted() -> AsyncIterator[AsyncEngine]:
    """A database filled at revision 0005 (one plain table), then migrated to head."""
    url = await create_pg_database(migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0005")
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO price_ticks (ticker, ts, price, slot_ts)"
                " SELECT t, 1700000000 + i * 60, 100 + i % 7, 1700000000 + i * 60"
                " FROM unnest(ARRAY['btc_usd', 'eth_usd']) AS t, generate_series(0, 4999) AS i"
            )
        )
    await asyncio.to_thread(migrations.upgrade, url)
    yield engine
    await engine.dispose()
    await drop_pg_database(url)


async def scalar(engine: AsyncEngine, sql: str, **parameters: object) -> object:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), parameters)).scalar_one()


async def home_of(engine: AsyncEngine, ticker: str, ts: int) -> str:
    found = await scalar(
        engine,
        "SELECT tableoid::regclass::text FROM price_ticks WHERE ticker = :t AND ts = :ts",
        t=ticker,
        ts=ts,
    )
    return str(found)


async def test_a_populated_table_is_converted_with_every_row_and_rule(converted: AsyncEngine) -> None:
    assert (
        await scalar(converted, "SELECT relkind::text FROM pg_class WHERE oid = 'price_ticks'::regclass")
        == "p"
    )
    assert await scalar(converted, "SELECT count(*) FROM price_ticks") == 10_000
    assert await home_of(converted, "btc_usd", 1_700_000_000) == "price_ticks_history"
    async with write_transaction(converted) as writer:
        again = await writer.insert_many([NewPrice("btc_usd", Decimal("1"), 1_700_000_000, None)])
        same_slot = await writer.insert_many(
            [NewPrice("btc_usd", Decimal("1"), 1_700_000_030, 1_700_000_000)]
        )
        fresh = await writer.insert_many([NewPrice("btc_usd", Decimal("2.5"), 1_700_600_000, 1_700_600_000)])
    assert (again, same_slot, fresh) == ([], [], [("btc_usd", 1_700_600_000)])
    with pytest.raises(IntegrityError):
        async with converted.begin() as connection:
            await PriceWriter(connection).insert_many([NewPrice("BTC USD", Decimal("1"), 1_700_700_000)])
    # New rows are numbered by the sequence, which now belongs to the partitioned table.
    assert await scalar(converted, "SELECT seq IS NOT NULL FROM price_ticks WHERE ts = 1700600000")
    owner = (
        "SELECT d.refobjid::regclass::text FROM pg_depend d WHERE d.objid = 'price_ticks_seq_seq'::regclass"
    )
    assert await scalar(converted, owner + " AND d.deptype = 'a'") == "price_ticks"


async def test_a_month_without_a_partition_waits_in_the_default_then_moves(converted: AsyncEngine) -> None:
    ts = YEAR_2030 + 3 * DAY
    async with write_transaction(converted) as writer:
        assert await writer.insert_many([NewPrice("btc_usd", Decimal("7.25"), ts, ts)])
    assert await home_of(converted, "btc_usd", ts) == "price_ticks_default"

    report = await maintain_storage(converted, retention_days=None, interval_seconds=60, now=ts)

    assert report.created == ["price_ticks_2030_01", "price_ticks_2030_02", "price_ticks_2030_03"]
    assert report.moved_from_default == 1
    assert await home_of(converted, "btc_usd", ts) == "price_ticks_2030_01"
    assert await scalar(converted, "SELECT count(*) FROM price_ticks_default") == 0
    async with write_transaction(converted) as writer:  # the new partition keeps the rules
        assert await writer.insert_many([NewPrice("btc_usd", Decimal("1"), ts + 5, ts)]) == []
    # Run again: nothing to do.
    assert (await maintain_storage(converted, retention_days=None, interval_seconds=60, now=ts)).created == []


async def test_retention_drops_whole_expired_months_and_deletes_the_rest(converted: AsyncEngine) -> None:
    january, february, march = (month_partition(2030, month) for month in (1, 2, 3))
    await maintain_storage(converted, retention_days=None, interval_seconds=60, now=january.lower)
    async with write_transaction(converted) as writer:
        for partition in (january, february, march):
            await writer.insert_many(
                [
                    NewPrice("eth_usd", Decimal("3.5"), ts, ts)
                    for ts in range(partition.lower, partition.lower + 10 * DAY, 3600)
                ]
            )
    now = february.lower + 40 * DAY  # the bound: 30 days before, ten days into February
    report = await maintain_storage(converted, retention_days=30, interval_seconds=60, now=now)

    # January 2030 is wholly older than the bound, and so is the history before 2027.
    assert report.dropped == ["price_ticks_history", "price_ticks_2030_01"]
    assert await scalar(converted, "SELECT to_regclass('price_ticks_2030_01') IS NULL")
    assert report.cutoff is not None
    left = "SELECT count(*) FROM price_ticks WHERE ticker = 'eth_usd' AND ts >= :lower"
    assert await scalar(converted, left.replace(">=", "<"), lower=report.cutoff) == 0
    # February's ten days lie before the bound (deleted in batches); March's are kept.
    assert report.deleted == 240
    assert await scalar(converted, left, lower=report.cutoff) == 240
    assert await scalar(converted, "SELECT count(*) FROM price_ticks") == 240


async def test_a_range_query_touches_only_its_month(converted: AsyncEngine) -> None:
    await maintain_storage(converted, retention_days=None, interval_seconds=60, now=YEAR_2030)
    statement = page_statement("json", "postgresql").params(
        ticker="btc_usd", limit=100, lower=YEAR_2030 + DAY, upper=YEAR_2030 + 2 * DAY, offset=0
    )
    sql = str(statement.compile(dialect=converted.dialect, compile_kwargs={"literal_binds": True}))
    async with converted.connect() as connection:
        plan = "\n".join(row[0] for row in await connection.execute(text("EXPLAIN " + sql)))
    assert "price_ticks_2030_01" in plan, plan
    assert "price_ticks_history" not in plan, plan
    assert "price_ticks_2030_02" not in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_a_busy_table_is_not_locked_for_a_drop_and_the_rows_still_go(
    converted: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding the table: creating and dropping partitions give up their lock waits
    (readers never queue behind them for long), the expired rows are deleted in batches
    instead, and the next run makes and drops what it could not."""
    monkeypatch.setattr(maintenance, "LOCK_RETRY_SECONDS", 0.05)
    january = month_partition(2030, 1)
    await maintain_storage(converted, retention_days=None, interval_seconds=60, now=january.lower)
    async with write_transaction(converted) as writer:
        await writer.insert_many(
            [
                NewPrice("eth_usd", Decimal("3.5"), ts, ts)
                for ts in range(january.lower, january.lower + DAY, 3600)
            ]
        )
    later = january.upper + 40 * DAY
    async with converted.connect() as reader, reader.begin():
        await reader.execute(text("SELECT count(*) FROM price_ticks"))  # its lock lasts the transaction
        started = time.monotonic()
        busy = await maintain_storage(converted, retention_days=30, interval_seconds=60, now=later)
        waited = time.monotonic() - started
    assert (busy.created, busy.dropped) == ([], [])  # April and May 2030 wait, and so do the drops
    assert waited < 15  # it gave up waiting for the reader (which held on for good)
    assert await scalar(converted, "SELECT count(*) FROM price_ticks WHERE ts < :c", c=busy.cutoff) == 0
    quiet = await maintain_storage(converted, retention_days=30, interval_seconds=60, now=later)
    assert "price_ticks_2030_01" in quiet.dropped
    assert quiet.created == ["price_ticks_2030_04", "price_ticks_2030_05"]
