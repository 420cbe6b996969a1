"""Storage figures: bytes per row on both backends (for the README's capacity table), and
dropping a month's partition while the API is under load."""

import asyncio
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import asyncpg

from bench.load import Load, load
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.partitions import PartitionAdmin
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from crypto_client.ingestion.maintenance import month_partition, when_the_table_allows
from tests.support.databases import plain_dsn

SQLITE_ROWS = 200_000
DROPPED_MONTH = month_partition(2031, 1)


async def postgres_bytes_per_row(url: str) -> float:
    """Heap, indexes and TOAST of every partition of price_ticks, and the roll-up, per row."""
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        size = await connection.fetchval(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('price_ticks')"
        )
        size += await connection.fetchval("SELECT pg_total_relation_size('price_candles_1h')")
        rows = await connection.fetchval("SELECT count(*) FROM price_ticks")
    finally:
        await connection.close()
    return float(size) / float(rows)


async def sqlite_bytes_per_row(rows: int = SQLITE_ROWS) -> float:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "capacity.db"
        url = f"sqlite:///{path}"
        await asyncio.to_thread(migrations.upgrade, url)
        engine = create_engine(url)
        try:
            per_ticker = rows // 10
            for n in range(10):
                async with write_transaction(engine) as writer:
                    await writer.insert_many(
                        [
                            NewPrice(f"sim{n:03d}_usd", Decimal(f"{43000 + i % 997}.{i % 100:02d}"), ts, ts)
                            for i, ts in enumerate(range(1_700_000_000, 1_700_000_000 + per_ticker * 60, 60))
                        ]
                    )
        finally:
            await engine.dispose()
        return path.stat().st_size / rows


async def fill_month(url: str, rows: int) -> None:
    """A month's partition holding `rows` rows (50 tickers)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await PartitionAdmin(connection).create(DROPPED_MONTH)
    finally:
        await engine.dispose()
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        await connection.execute(
            "INSERT INTO price_ticks (ticker, ts, price, slot_ts, source)"
            " SELECT 'fill' || (i % 50), $1::bigint + (i / 50) * 60, 100.5,"
            " $1::bigint + (i / 50) * 60, 'poll'"
            " FROM generate_series(0, $2::int - 1) AS i",
            DROPPED_MONTH.lower,
            rows,
        )
    finally:
        await connection.close()


def drop_under_load(
    db_url: str, api_url: str, seconds: float, connections: int, rows: int
) -> tuple[Load, Load, float]:
    """`/prices/latest` under load without, then with, a month's partition of `rows` rows
    dropped in the middle of the run; returns both loads and how long the drop took."""
    quiet = load(api_url, seconds, connections)
    asyncio.run(fill_month(db_url, rows))
    took: list[float] = []

    def drop() -> None:
        time.sleep(seconds / 2)

        async def run() -> None:
            engine = create_engine(db_url)
            try:
                started = time.perf_counter()
                done, _ = await when_the_table_allows(engine, "drop", DROPPED_MONTH, PartitionAdmin.drop)
                assert done, "the partition could not be dropped"
                took.append(time.perf_counter() - started)
            finally:
                await engine.dispose()

        asyncio.run(run())

    dropper = threading.Thread(target=drop)
    dropper.start()
    busy = load(api_url, seconds, connections)
    dropper.join()
    return quiet, busy, took[0]
