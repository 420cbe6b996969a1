"""Data out on the benchmark's table: Parquet against CSV over HTTP (rows/s, bytes/row), the
server's RSS during a one-ticker full-history Parquet export, and DuckDB over the lake against
the same query in PostgreSQL.

    uv run python -m bench.data_out [--tickers N] [--rows-per-ticker N] [--keep]

The table is loaded as `python -m bench` loads it (bench/database.py's `create_database`).
"""

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import duckdb
import httpx

from bench.common import ADMIN_URL, WORK, Plan, Results, peak_rss, server
from bench.database import create_database
from bench.report import machine
from crypto_client.db.engine import create_engine
from crypto_client.db.reader import PriceReader
from crypto_client.export.lake import write_lake
from tests.support.databases import drop_pg_database
from tests.support.services import free_port


def timed_download(url: str) -> tuple[float, int]:
    """Seconds and bytes of one whole download, read as it streams."""
    started = time.monotonic()
    size = 0
    with httpx.Client(timeout=600) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            size += len(chunk)
    return time.monotonic() - started, size


def http_exports(plan: Plan, url: str, lines: list[str]) -> None:
    port = free_port()
    env = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "API_STATEMENT_TIMEOUT_SECONDS": "60"}
    ticker = plan.names[0]
    rows = plan.rows_per_ticker
    with server(
        [sys.executable, "-m", "bench.server", str(port), "granian"], env, port, "data-out.log"
    ) as proc:
        base = f"http://127.0.0.1:{port}/prices/export?ticker={ticker}"
        # Warm up the server, its pool, and pyarrow (loaded by the first Parquet export).
        started = time.monotonic()
        timed_download(base + "&format=parquet&to_ts=0")
        first_parquet = time.monotonic() - started
        for fmt in ("csv", "ndjson"):
            timed_download(f"{base}&format={fmt}&to_ts=0")
        with peak_rss(proc) as idle:
            time.sleep(1)
        figures = {}
        for fmt in ("csv", "ndjson", "parquet"):
            with peak_rss(proc) as peak:
                seconds, size = timed_download(f"{base}&format={fmt}")
            figures[fmt] = (seconds, size, peak[0])
    lines.append(f"One ticker's full history over HTTP ({rows:,} rows, `{ticker}`):")
    lines.append("")
    lines.append("| format | rows/s | bytes/row | server peak RSS | over idle |")
    lines.append("|---|---:|---:|---:|---:|")
    for fmt, (seconds, size, rss) in figures.items():
        lines.append(
            f"| {fmt} | {rows / seconds:,.0f} | {size / rows:.1f} | {rss:.0f} MB | +{rss - idle[0]:.0f} MB |"
        )
    csv_seconds, csv_size, _ = figures["csv"]
    pq_seconds, pq_size, pq_rss = figures["parquet"]
    lines.append("")
    lines.append(
        f"Parquet against CSV: {csv_seconds / pq_seconds:.2f}x CSV's rows/s (goal ≥ 1),"
        f" {pq_size / csv_size:.2f}x its bytes (goal ≤ 0.33); server RSS during the Parquet export"
        f" {pq_rss:.0f} MB (goal < 200 MB), {pq_rss - idle[0]:.0f} MB more than idle"
        f" ({idle[0]:.0f} MB, granian's main process and its worker, after warm-up)."
        f" The first Parquet export of a process also loads pyarrow:"
        f" that empty export took {first_parquet:.2f} s."
    )
    lines.append("")


async def lake_queries(plan: Plan, url: str, lines: list[str]) -> None:
    out = WORK / "lake"
    engine = create_engine(url, read_only=True)

    @contextlib.asynccontextmanager
    async def open_reader() -> AsyncIterator[PriceReader]:
        async with engine.connect() as connection:
            yield PriceReader(connection)

    try:
        started = time.monotonic()
        first = await write_lake(open_reader, out, None, interval=60)
        written_seconds = time.monotonic() - started
        started = time.monotonic()
        await write_lake(open_reader, out, None, interval=60)
        rerun_seconds = time.monotonic() - started
    finally:
        await engine.dispose()
    total = plan.tickers * plan.rows_per_ticker
    lines.append(
        f"Lake of {total:,} rows: {first.written:,} files written in {written_seconds:.1f} s"
        f" ({total / written_seconds:,.0f} rows/s); a rerun (hashes of final days checked)"
        f" {rerun_seconds:.1f} s."
    )
    lines.append("")
    query = "SELECT count(*), avg(price) FROM {}"
    glob = f"{out}/*/*.parquet"
    duck = duckdb.connect()
    timings = []
    for _ in range(3):
        started = time.monotonic()
        duck_count, duck_avg = duck.execute(query.format("read_parquet(?)"), [glob]).fetchone() or (0, 0)
        timings.append(time.monotonic() - started)
    duck_seconds = min(timings)
    connection = await asyncpg.connect(url)
    try:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            pg_count, pg_avg = await connection.fetchrow(query.format("price_ticks"))
            timings.append(time.monotonic() - started)
        pg_seconds = min(timings)
    finally:
        await connection.close()
    assert duck_count == pg_count == total, (duck_count, pg_count, total)
    lines.append("`SELECT count(*), avg(price)` over every row (best of 3):")
    lines.append("")
    lines.append("| engine | seconds | avg(price) |")
    lines.append("|---|---:|---:|")
    lines.append(f"| DuckDB over the lake folder | {duck_seconds:.3f} | {duck_avg} |")
    lines.append(f"| PostgreSQL on price_ticks | {pg_seconds:.3f} | {pg_avg} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_out", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickers", type=int, default=20)
    parser.add_argument("--rows-per-ticker", type=int, default=500_000)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()
    plan = Plan(args.tickers, args.rows_per_ticker, 0, 0, 0, smoke=False)
    WORK.mkdir(exist_ok=True)
    url = asyncio.run(create_database(plan, Results()))
    lines = [f"Machine: {machine()}", ""]
    try:
        http_exports(plan, url, lines)
        asyncio.run(lake_queries(plan, url, lines))
    finally:
        if not args.keep:
            asyncio.run(drop_pg_database(url, ADMIN_URL))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
