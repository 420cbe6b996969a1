"""Data out on the benchmark's table: Parquet against CSV over HTTP (rows/s, bytes/row), the
memory (RSS and PSS) of `crypto-client api` during a one-ticker full-history Parquet export,
and DuckDB over the lake against the same query in PostgreSQL.

    uv run python -m bench.data_out [--tickers N] [--rows-per-ticker N] [--keep]

The table is loaded as `python -m bench` loads it (bench/database.py's `create_database`).
"""

import argparse
import asyncio
import contextlib
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import duckdb
import httpx
import psutil

from bench.common import ADMIN_URL, WORK, Plan, Results, sampling, server
from bench.database import create_database
from bench.report import machine
from crypto_client.db.engine import create_engine
from crypto_client.db.reader import PriceReader
from crypto_client.export.lake import write_lake
from tests.support.databases import drop_pg_database
from tests.support.services import crypto_client, free_port


def timed_download(url: str) -> tuple[float, int]:
    """Seconds and bytes of one whole download, read as it streams."""
    started = time.monotonic()
    size = 0
    with httpx.Client(timeout=600) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            size += len(chunk)
    return time.monotonic() - started, size


ROUNDS = 3  # each format's export, in turns: the machine is shared, one run of each is noise


@dataclass
class Memory:
    """Peaks over the server's process family, MB: `crypto-client api` as production runs it,
    one process (with `--workers N`, its main process and N workers).
    RSS counts every page a process maps, shared libraries included, once per process; PSS
    divides each page among the processes sharing it (the family's part of the machine's RAM)."""

    rss: float = 0.0
    pss: float = 0.0
    by_process: dict[str, tuple[float, float]] = field(default_factory=dict)  # at the RSS peak


@contextlib.contextmanager
def peak_memory(process: psutil.Process) -> Iterator[Memory]:
    peak = Memory()

    def sample(family: list[psutil.Process]) -> None:
        each = {
            "main" if n == 0 else f"worker {n}": member.memory_full_info() for n, member in enumerate(family)
        }
        rss = sum(info.rss for info in each.values()) / 2**20
        peak.pss = max(peak.pss, sum(info.pss for info in each.values()) / 2**20)
        if rss > peak.rss:
            peak.rss = rss
            peak.by_process = {name: (info.rss / 2**20, info.pss / 2**20) for name, info in each.items()}

    with sampling(process, sample):
        yield peak


def http_exports(plan: Plan, url: str, lines: list[str]) -> None:
    port = free_port()
    env = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "API_STATEMENT_TIMEOUT_SECONDS": "60"}
    ticker = plan.names[0]
    rows = plan.rows_per_ticker
    formats = ("csv", "ndjson", "parquet")
    with server(crypto_client("api", "--port", str(port)), env, port, "data-out.log") as proc:
        base = f"http://127.0.0.1:{port}/prices/export?ticker={ticker}"
        with peak_memory(proc) as cold:
            time.sleep(1)
        # Warm up the server, its pool, and pyarrow (loaded by the first Parquet export).
        started = time.monotonic()
        timed_download(base + "&format=parquet&to_ts=0")
        first_parquet = time.monotonic() - started
        for fmt in ("csv", "ndjson"):
            timed_download(f"{base}&format={fmt}&to_ts=0")
        with peak_memory(proc) as idle:
            time.sleep(1)
        seconds: dict[str, list[float]] = {fmt: [] for fmt in formats}
        memory: dict[str, list[Memory]] = {fmt: [] for fmt in formats}
        sizes: dict[str, int] = {}
        for _ in range(ROUNDS):
            for fmt in formats:
                with peak_memory(proc) as peak:
                    took, sizes[fmt] = timed_download(f"{base}&format={fmt}")
                seconds[fmt].append(took)
                memory[fmt].append(peak)
    median = {fmt: statistics.median(seconds[fmt]) for fmt in formats}
    rss = {fmt: max(memory[fmt], key=lambda each: each.rss) for fmt in formats}
    pss = {fmt: max(each.pss for each in memory[fmt]) for fmt in formats}
    lines.append(
        f"One ticker's full history over HTTP ({rows:,} rows, `{ticker}`; each format {ROUNDS} times,"
        " in turns; rows/s of the median run, memory the peak over the runs):"
    )
    lines.append("")
    lines.append(
        "| format | rows/s (median) | rows/s (each run) | bytes/row | peak RSS | peak PSS | RSS over idle |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for fmt in formats:
        runs = ", ".join(f"{rows / each:,.0f}" for each in seconds[fmt])
        lines.append(
            f"| {fmt} | {rows / median[fmt]:,.0f} | {runs} | {sizes[fmt] / rows:.1f}"
            f" | {rss[fmt].rss:.0f} MB | {pss[fmt]:.0f} MB | +{rss[fmt].rss - idle.rss:.0f} MB |"
        )
    parquet = rss["parquet"]
    split = ", ".join(
        f"{name} {r:.0f} MB RSS / {p:.0f} MB PSS" for name, (r, p) in parquet.by_process.items()
    )
    lines.append("")
    lines.append(
        f"Parquet against CSV: {median['csv'] / median['parquet']:.2f}x CSV's rows/s (medians; goal ≥ 1),"
        f" {sizes['parquet'] / sizes['csv']:.2f}x its bytes (goal ≤ 0.33). Server memory during the"
        f" Parquet exports: {parquet.rss:.0f} MB RSS (goal < 200 MB), {pss['parquet']:.0f} MB PSS"
        f" ({split}). Idle after the warm-up: {idle.rss:.0f} MB RSS, {idle.pss:.0f} MB PSS; before it"
        f" (no pyarrow loaded yet): {cold.rss:.0f} MB RSS, {cold.pss:.0f} MB PSS. The first Parquet"
        f" export of a process also loads pyarrow: that empty export took {first_parquet:.2f} s."
    )
    lines.append("")


async def lake_queries(plan: Plan, url: str, lines: list[str]) -> None:
    out = WORK / "lake"
    # A fresh lake: files left by an earlier run would be checked, not written.
    shutil.rmtree(out, ignore_errors=True)
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
