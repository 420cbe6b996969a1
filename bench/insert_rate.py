"""Bulk insert rows/s on both backends, in a minute: what the roll-up's triggers cost.

    uv run python -m bench.insert_rate [--rows N] [--repeats N]

Each case runs `--repeats` times on a fresh, migrated database and reports the median: the
service's `insert_many` in one transaction and in tick-sized transactions, and plain SQL
(PostgreSQL: `INSERT ... SELECT generate_series` and `COPY`; SQLite: `executemany`). Run it on
two commits (`PYTHONPATH=<other checkout>/src` points it at another one's code and migrations)
on the same machine to compare them.
"""

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import asyncpg

from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from crypto_client.db.writer import write_transaction
from crypto_client.domain import NewPrice
from tests.support.databases import create_pg_database, drop_pg_database, plain_dsn

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_TS = 1_699_999_980
TICK_TICKERS = 50

Case = Callable[[str, str, int], Awaitable[None]]  # url, ticker, rows


def _prices(ticker: str, rows: int, *, step: int = 1) -> list[NewPrice]:
    return [
        NewPrice(ticker, Decimal(f"{43000 + n % 997}.{n % 100:02d}"), BASE_TS + n * step) for n in range(rows)
    ]


async def one_transaction(url: str, ticker: str, rows: int) -> None:
    engine = create_engine(url)
    try:
        async with write_transaction(engine) as writer:
            assert len(await writer.insert_many(_prices(ticker, rows))) == rows
    finally:
        await engine.dispose()


async def tick_transactions(url: str, ticker: str, rows: int) -> None:
    """Ticks of 50 tickers, one transaction each, one second apart."""
    engine = create_engine(url)
    try:
        for tick in range(rows // TICK_TICKERS):
            async with write_transaction(engine) as writer:
                await writer.insert_many(
                    [
                        NewPrice(f"{ticker}_{n}", Decimal(f"{43000 + tick % 997}.5"), BASE_TS + tick)
                        for n in range(TICK_TICKERS)
                    ]
                )
    finally:
        await engine.dispose()


async def postgres_insert_select(url: str, ticker: str, rows: int) -> None:
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        await connection.execute(
            "INSERT INTO price_ticks (ticker, ts, price, slot_ts)"
            " SELECT $1, $2::bigint + i, 43000 + (i % 997) + 0.25, $2::bigint + i"
            " FROM generate_series(0, $3::int - 1) AS i",
            ticker,
            BASE_TS,
            rows,
        )
    finally:
        await connection.close()


async def postgres_copy(url: str, ticker: str, rows: int) -> None:
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        await connection.copy_records_to_table(
            "price_ticks",
            records=[(p.ticker, p.ts, p.price, p.ts) for p in _prices(ticker, rows)],
            columns=["ticker", "ts", "price", "slot_ts"],
        )
    finally:
        await connection.close()


async def sqlite_executemany(url: str, ticker: str, rows: int) -> None:
    def run() -> None:
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            with connection:
                connection.executemany(
                    "INSERT INTO price_ticks (ticker, ts, price, slot_ts) VALUES (?, ?, ?, ?)",
                    [(p.ticker, p.ts, str(p.price), p.ts) for p in _prices(ticker, rows)],
                )
        finally:
            connection.close()

    await asyncio.to_thread(run)


CASES: dict[str, list[tuple[str, Case, int]]] = {
    # name, case, rows as a multiple of --rows (plain SQL is cheap: give it more to time)
    "PostgreSQL": [
        ("insert_many, one transaction", one_transaction, 1),
        ("insert_many, ticks of 50 rows", tick_transactions, 1),
        ("INSERT ... SELECT generate_series", postgres_insert_select, 10),
        ("COPY", postgres_copy, 2),
    ],
    "SQLite": [
        ("insert_many, one transaction", one_transaction, 1),
        ("insert_many, ticks of 50 rows", tick_transactions, 1),
        ("sqlite3 executemany", sqlite_executemany, 2),
    ],
}


async def measure(backend: str, rows: int, repeats: int) -> list[tuple[str, int, float, float]]:
    """Per case: rows, median rows/s by the clock and by this process's CPU time (all of
    SQLite's work, steadier than the clock on a busy machine)."""
    found = []
    for name, case, factor in CASES[backend]:
        rates, cpu_rates = [], []
        for repeat in range(repeats):
            with tempfile.TemporaryDirectory() as directory:
                if backend == "PostgreSQL":
                    url = await create_pg_database(ADMIN_URL, prefix="cc_bench_insert", migrate=False)
                else:
                    url = f"sqlite:///{Path(directory) / 'insert.db'}"
                try:
                    await asyncio.to_thread(migrations.upgrade, url)
                    count = rows * factor
                    started, cpu_started = time.perf_counter(), time.process_time()
                    await case(url, f"bulk{repeat}_usd", count)
                    rates.append(count / (time.perf_counter() - started))
                    cpu_rates.append(count / (time.process_time() - cpu_started))
                finally:
                    if backend == "PostgreSQL":
                        await drop_pg_database(url, ADMIN_URL)
        found.append((name, rows * factor, statistics.median(rates), statistics.median(cpu_rates)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=list(CASES), action="append", help="default: both")
    args = parser.parse_args()
    print(f"code: {Path(migrations.__file__).resolve().parents[3]}")
    print("| Backend | Case | Rows | Median rows/s | Median rows per CPU second (this process) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for backend in args.backend or CASES:
        for name, count, rate, cpu_rate in asyncio.run(measure(backend, args.rows, args.repeats)):
            # The server does PostgreSQL's work: this process's CPU time says nothing of it.
            cpu = f"{cpu_rate:,.0f}" if backend == "SQLite" else "n/a"
            print(f"| {backend} | {name} | {count:,} | {rate:,.0f} | {cpu} |")


if __name__ == "__main__":
    main()
