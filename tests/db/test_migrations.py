import asyncio
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.models import Base
from crypto_client.db.reader import PriceReader
from crypto_client.db.writer import PriceWriter
from crypto_client.domain import NewPrice
from tests.support import launcher
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import crypto_client


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_and_downgrade_on_postgresql() -> None:
    url = await create_pg_database(migrate=False)
    try:
        await asyncio.to_thread(migrations.upgrade, url)
        assert "price_ticks" in await _tables(url)
        await asyncio.to_thread(migrations.downgrade, url)
        assert "price_ticks" not in await _tables(url)
        await asyncio.to_thread(migrations.upgrade, url)
        assert "price_ticks" in await _tables(url)
    finally:
        await drop_pg_database(url)


async def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    await asyncio.to_thread(migrations.upgrade, url)
    assert "price_ticks" in await _tables(url)
    await asyncio.to_thread(migrations.downgrade, url)
    assert "price_ticks" not in await _tables(url)


async def test_cli_migrate_then_the_seed_query_runs() -> None:
    url = await create_pg_database(migrate=False)
    try:
        result = launcher.run(
            crypto_client("migrate"),
            env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    text("select ticker, ts, price from price_ticks order by ts desc limit 10;")
                )
                assert rows.all() == []
        finally:
            await engine.dispose()
    finally:
        await drop_pg_database(url)


def test_models_match_the_migrations(sqlite_url: str) -> None:
    """Autogenerate finds nothing to do: the committed revision is the models' schema."""
    engine = create_sync_engine(sqlite_url.replace("sqlite:", "sqlite+pysqlite:"))
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == []


@pytest.mark.slow
async def test_concurrent_migrations_on_a_fresh_database_all_succeed() -> None:
    url = await create_pg_database(migrate=False)
    try:
        # Forked by the launcher so that the ten start within milliseconds of each other.
        runs = [
            launcher.Popen(
                crypto_client("migrate"),
                env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(10)
        ]
        results = [await asyncio.to_thread(run.communicate, timeout=120) for run in runs]
        for run, (_out, err) in zip(runs, results, strict=True):
            assert run.returncode == 0, err.decode()
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                versions = (await connection.execute(text("SELECT version_num FROM alembic_version"))).all()
        finally:
            await engine.dispose()
        assert len(versions) == 1
        assert await _tables(url) == {
            "alembic_version",
            "price_ticks",
            "price_ticks_history",  # its partitions (revision 0006)
            "price_ticks_default",
            "tracked_tickers",
            "slot_failures",
            "price_candles_1h",
            "data_origin",
            "trade_backfill_days",  # revision 0009
            "settlement_prices",
            "api_keys",
        }
    finally:
        await drop_pg_database(url)


@pytest.mark.parametrize(
    ("ticker", "ts", "slot_ts"),
    [
        ("BTC_USD", 10, None),
        ("btc usd", 10, None),
        ("-btc", 10, None),
        ("btc_usd", -5, None),
        ("btc_usd", 10, 20),
    ],
)
async def test_the_table_refuses_rows_outside_the_rules(
    engine: AsyncEngine, ticker: str, ts: int, slot_ts: int | None
) -> None:
    with pytest.raises(IntegrityError):
        async with engine.begin() as connection:
            await PriceWriter(connection).insert_many([NewPrice(ticker, Decimal("1"), ts, slot_ts)])


_OLD_WRITER_INSERT = text(
    "INSERT INTO price_ticks (ticker, ts, price, source) VALUES ('btc_usd', :ts, :p, :s)"
)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_the_candle_roll_up_is_built_from_existing_rows(backend: str, tmp_path: Path) -> None:
    """Rows stored before revision 0005 (here: by plain SQL, as any old writer did) are
    rolled up by it: hour-based candles then equal candles computed from the rows."""
    url = (
        await create_pg_database(migrate=False) if backend == "postgresql" else f"sqlite:///{tmp_path}/old.db"
    )
    try:
        await asyncio.to_thread(migrations.upgrade, url, "0004")
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                for n in range(500):
                    ts = n * 601  # about six rows an hour, hours cut anywhere
                    price = f"{43000 + (n * 37) % 101}.{n % 7}"
                    source = "backfill" if n % 5 == 0 else "poll"
                    await connection.execute(_OLD_WRITER_INSERT, {"ts": ts, "p": price, "s": source})
            await asyncio.to_thread(migrations.upgrade, url)
            async with engine.connect() as connection:
                reader = PriceReader(connection)
                for size in (3600, 4 * 3600, 86_400):
                    rolled = await reader.candles("btc_usd", size, 0, 0, 500 * 601)
                    from_rows = await reader.candles_from_rows("btc_usd", size, 0, 0, 500 * 601)
                    assert rolled == from_rows
                    assert sum(candle.rows for candle in rolled) == 500
        finally:
            await engine.dispose()
    finally:
        if backend == "postgresql":
            await drop_pg_database(url)
