"""The benchmark's database: a fresh PostgreSQL one loaded with the plan's history, and
pgbench's ceiling on the latest-price query."""

import asyncio
import re
import shutil
import subprocess
import time
from decimal import Decimal

import asyncpg
from sqlalchemy.engine import make_url

from bench.common import ADMIN_URL, BASE_TS, STEP, WORK, Plan, Results
from bench.storage import postgres_bytes_per_row, sqlite_bytes_per_row
from crypto_client.db import migrations
from crypto_client.sim.prices import INDEXES
from tests.support.databases import create_pg_database


async def load_history(connection: asyncpg.Connection, names: list[str], rows_per_ticker: int) -> None:
    """`rows_per_ticker` one-minute rows of each index from BASE_TS on, each tracked from its
    first slot, into a database at revision 0004 (before partitioning)."""
    # Bulk load without the indexes, then build them once: minutes become seconds.
    await connection.execute("ALTER TABLE price_ticks DROP CONSTRAINT pk_price_ticks")
    await connection.execute("DROP INDEX ix_price_ticks_ticker_slot_ts")
    await connection.execute(
        """
        INSERT INTO price_ticks (ticker, ts, price, slot_ts)
        SELECT names.ticker, $1::bigint + i * $2, round((names.base * (1 + 0.05 * sin(i / 997.0)))::numeric,
               names.decimals), $1::bigint + i * $2
        FROM unnest($3::text[], $4::numeric[], $5::int[]) AS names(ticker, base, decimals),
             generate_series(0, $6::int - 1) AS i
        """,
        BASE_TS,
        STEP,
        names,
        [Decimal(INDEXES[name][0]) for name in names],
        [INDEXES[name][1] for name in names],
        rows_per_ticker,
    )
    await connection.execute("ALTER TABLE price_ticks ADD CONSTRAINT pk_price_ticks PRIMARY KEY (ticker, ts)")
    await connection.execute(
        "CREATE UNIQUE INDEX ix_price_ticks_ticker_slot_ts ON price_ticks (ticker, slot_ts)"
    )
    # Every ticker tracked from its first slot, as ingestion would have recorded it.
    await connection.execute(
        "INSERT INTO tracked_tickers (ticker, since_slot_ts) SELECT unnest($1::text[]), $2::bigint",
        names,
        BASE_TS,
    )
    await connection.execute("VACUUM ANALYZE price_ticks")


async def create_database(plan: Plan, results: Results) -> str:
    # Loaded at revision 0004, then migrated: the candle roll-up (0005) is built from the rows
    # as it would be on an existing installation.
    url = await create_pg_database(ADMIN_URL, prefix="cc_bench", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0004")
    connection = await asyncpg.connect(url)
    started = time.monotonic()
    await load_history(connection, plan.names, plan.rows_per_ticker)
    rows = await connection.fetchval("SELECT count(*) FROM price_ticks")
    print(f"loaded {rows:,} rows in {time.monotonic() - started:.1f}s into {make_url(url).database}")
    started = time.monotonic()
    await asyncio.to_thread(migrations.upgrade, url)
    await connection.execute("VACUUM ANALYZE price_candles_1h")
    results.extra[f"Migration to head on {rows:,} rows (candle roll-up, then partitioning)"] = (
        f"{time.monotonic() - started:.1f} s"
    )
    results.bytes_per_row["PostgreSQL"] = await postgres_bytes_per_row(url)
    results.bytes_per_row["SQLite"] = await sqlite_bytes_per_row()
    await connection.close()
    return url


def pgbench_ceiling(plan: Plan, url: str, results: Results) -> None:
    if not shutil.which("pgbench"):
        results.extra["pgbench (latest-price SQL)"] = "pgbench not installed"
        return
    script = WORK / "latest.sql"
    # The query /prices/latest sends; the ticker is one of our own index names, not input.
    where = f"WHERE ticker = '{plan.names[0]}'"
    script.write_text(f"SELECT ticker, price, ts FROM price_ticks {where} ORDER BY ts DESC LIMIT 1;\n")  # noqa: S608
    target = make_url(url)
    output = subprocess.run(
        [
            "pgbench",
            "-n",
            "-c",
            str(plan.connections),
            "-j",
            "2",
            "-T",
            str(max(1, round(plan.seconds))),
            "-f",
            str(script),
            "-h",
            target.host or "127.0.0.1",
            "-p",
            str(target.port or 5432),
            "-U",
            target.username or "postgres",
            target.database or "",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = re.search(r"tps = ([\d.]+)", output)
    latency = re.search(r"latency average = ([\d.]+) ms", output)
    results.extra["pgbench, latest-price SQL (database ceiling)"] = (
        f"{float(tps.group(1)) if tps else 0:,.0f} queries/s, mean {latency.group(1) if latency else '?'} ms"
        f" at {plan.connections} clients"
    )
