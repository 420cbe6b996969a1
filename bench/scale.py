"""Years of data: the API on a 50-million-row table partitioned by month, against the figures
of the main run (10 million rows in one partition), same machine.

    uv run python -m bench.scale          # about 8 minutes; appends to bench/RESULTS.md

100 tickers x 500,000 one-minute rows from February 2027 on: twelve monthly partitions of
about four million rows, each loaded as a plain table, indexed, then attached (what the
storage upkeep's partitions look like, minus the wait).
"""

import asyncio
import re
import sys
import time

import asyncpg

from bench.common import ADMIN_URL, HERE, WORK, server
from bench.load import load
from crypto_client.ingestion.maintenance import month_partition
from crypto_client.sim.prices import INDEXES, SYNTHETIC_INDEXES
from tests.support.databases import create_pg_database, drop_pg_database, plain_dsn
from tests.support.services import free_port

TICKERS = [*INDEXES, *SYNTHETIC_INDEXES][:100]
ROWS_PER_TICKER = 500_000
STEP = 60
FIRST_MONTH = (2027, 2)
SECONDS = 10
CONNECTIONS = 64


def months() -> list[tuple[str, int, int]]:
    year, month = FIRST_MONTH
    found: list[tuple[str, int, int]] = []
    start = month_partition(year, month).lower
    end = start + ROWS_PER_TICKER * STEP
    while True:
        partition = month_partition(year, month)
        if partition.lower >= end:
            return found
        found.append((partition.name, partition.lower, partition.upper))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


async def load_partitioned(url: str) -> int:
    connection = await asyncpg.connect(plain_dsn(url))
    base = month_partition(*FIRST_MONTH).lower
    end = base + ROWS_PER_TICKER * STEP
    try:
        for name, lower, upper in months():
            started = time.monotonic()
            await connection.execute(
                f'CREATE TABLE "{name}" (LIKE price_ticks INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'
            )
            await connection.execute(
                f'INSERT INTO "{name}" (ticker, ts, price, slot_ts)'  # noqa: S608 - our own names
                " SELECT t.ticker, s.ts, round((100 + 5 * sin(s.ts / 59000.0))::numeric, 2), s.ts"
                " FROM unnest($1::text[]) AS t(ticker),"
                " generate_series($2::bigint, $3::bigint - 1, $4::bigint) AS s(ts)",
                TICKERS,
                max(lower, base),
                min(upper, end),
                STEP,
            )
            await connection.execute(
                f'ALTER TABLE "{name}" ADD CONSTRAINT "pk_{name}" PRIMARY KEY (ticker, ts)'
            )
            await connection.execute(
                f'CREATE UNIQUE INDEX "ix_{name}_ticker_slot_ts" ON "{name}" (ticker, slot_ts)'
            )
            await connection.execute(
                f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_range" CHECK (ts >= {lower} AND ts < {upper})'
            )
            await connection.execute(
                f'ALTER TABLE price_ticks ATTACH PARTITION "{name}" FOR VALUES FROM ({lower}) TO ({upper})'
            )
            await connection.execute(f'VACUUM ANALYZE "{name}"')
            print(f"{name} loaded in {time.monotonic() - started:.0f} s", flush=True)
        await connection.execute(
            "INSERT INTO tracked_tickers (ticker, since_slot_ts) SELECT unnest($1::text[]), $2::bigint",
            TICKERS,
            base,
        )
        return int(await connection.fetchval("SELECT count(*) FROM price_ticks"))
    finally:
        await connection.close()


def main_run_figures(results: str) -> dict[str, float]:
    """req/s of the scenarios to compare, from the main run's report."""
    found = {}
    for label in ("/prices limit=1000, first page", "/prices/range 1440 rows, middle"):
        match = re.search(re.escape(f"| {label} | ") + r"([\d,]+) \| ([\d.]+) \|", results)
        if match:
            found[label] = float(match.group(1).replace(",", ""))
    return found


def main() -> None:
    WORK.mkdir(exist_ok=True)
    url = asyncio.run(create_pg_database(ADMIN_URL, prefix="cc_bench_scale"))
    try:
        started = time.monotonic()
        rows = asyncio.run(load_partitioned(url))
        loaded = time.monotonic() - started
        ticker = TICKERS[0]
        middle = month_partition(*FIRST_MONTH).lower + (ROWS_PER_TICKER // 2) * STEP
        scenarios = {
            "/prices limit=1000, first page": f"/prices?ticker={ticker}&limit=1000",
            "/prices/range 1440 rows, middle": (
                f"/prices/range?ticker={ticker}&from_ts={middle}&to_ts={middle + 1440 * STEP - 1}&limit=1440"
            ),
        }
        port = free_port()
        env = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "API_STATEMENT_TIMEOUT_SECONDS": "60"}
        measured = {}
        with server([sys.executable, "-m", "bench.server", str(port), "granian"], env, port, "scale.log"):
            for label, path in scenarios.items():
                measured[label] = load(f"http://127.0.0.1:{port}{path}", SECONDS, CONNECTIONS)
                print(f"{label}: {measured[label].rps:,.0f} req/s", flush=True)
    finally:
        asyncio.run(drop_pg_database(url, ADMIN_URL))

    report = HERE / "RESULTS.md"
    before = main_run_figures(report.read_text())
    lines = [
        "",
        "## 50 million rows, partitioned by month (`uv run python -m bench.scale`)",
        "",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {rows:,} rows"
        f" ({len(TICKERS)} tickers x {ROWS_PER_TICKER:,} one-minute rows) in {len(months())} monthly"
        f" partitions, loaded in {loaded:.0f} s; wrk, {CONNECTIONS} connections, {SECONDS} s per scenario",
        "",
        "| Scenario | req/s | p50 ms | p99 ms | main run (10 M rows, one partition) req/s | main / this |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, ours in measured.items():
        reference = before.get(label)
        ratio = f"{reference / ours.rps:.2f}x" if reference else "—"
        figures = f"{ours.rps:,.0f} | {ours.p50_ms:.1f} | {ours.p99_ms:.1f}"
        lines.append(f"| {label} | {figures} | {reference or 0:,.0f} | {ratio} |")
    lines.append("")
    lines.append("Target: each within 1.2x of the main run (main / this <= 1.2).")
    text = report.read_text().split("\n## 50 million rows")[0].rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    report.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
